"""`mveb pretrain|knn|lineval|export|report`."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("pretrain", help="MVEB pretraining (single process, or one rank under SLURM/torchrun)",
                       formatter_class=fmt)
    p.add_argument("--config", default="imagenet_rn50",
                   help="recipe preset (imagenet_rn50, demo) or a run's config.json, to repeat or extend that run")
    p.add_argument("--data", required=True, help="ImageFolder root or .beton shard")
    p.add_argument("--out", required=True, help="run folder; rerunning resumes from its newest checkpoint")
    p.add_argument("--steps", type=int, default=None, help="stop after this many optimizer steps in total")
    p.add_argument("--epochs", type=int, default=None, help="schedule length in epochs (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="per-GPU (per-process) batch size")
    p.add_argument("--loader", default=None, choices=["ffcv", "dali", "torch"], help="input pipeline backend")
    p.add_argument("--resume", default="auto", help="auto (newest checkpoint in --out) or a checkpoint path")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override any config field")
    p.set_defaults(func=_run_pretrain)

    for name, what in (("knn", "weighted kNN accuracy (k=200, T=0.1) of a backbone"),
                       ("lineval", "linear evaluation on frozen backbone features")):
        p = sub.add_parser(name, help=what, formatter_class=fmt)
        p.add_argument("--checkpoint", default=None, help="run folder, checkpoint or exported backbone; none = random init")
        p.add_argument("--train", required=True, help="labelled ImageFolder or .beton for the memory bank / head")
        p.add_argument("--val", required=True, help="labelled ImageFolder or .beton to score")
        p.add_argument("--arch", default=None, help="torchvision ResNet name; unset: the checkpoint's (resnet50 for random init)")
        p.add_argument("--image-size", type=int, default=224, help="centre crop side (resize to size / 0.875 first)")
        p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
        p.add_argument("--workers", type=int, default=None, help="decoding processes; unset: min(8, CPUs allotted)")
        p.add_argument("--json", default=None, help="write the result as JSON here ('-' for stdout)")
        if name == "knn":
            p.add_argument("--k", type=int, default=200, help="neighbours (clipped to the memory bank size)")
            p.add_argument("--temperature", type=float, default=0.1, help="vote weight exp(similarity / T)")
            p.set_defaults(func=_run_knn)
        else:
            p.add_argument("--epochs", type=int, default=100, help="passes over --train for the head")
            p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate per 256 samples (cosine decay)")
            p.add_argument("--precompute", action="store_true",
                           help="fast: train the head on centre-crop features computed once (no augmentation)")
            p.add_argument("--out", default=None,
                           help="resumable run folder: head state saved every epoch, every --checkpoint-minutes and "
                                "on SIGTERM/SIGUSR2 (then exit 128+signal); rerunning the same command resumes, "
                                "other settings are an error, a completed run prints its stored DIR/lineval.json")
            p.add_argument("--checkpoint-minutes", type=float, default=30.0,
                           help="with --out: also save the head state at a batch boundary this often")
            p.set_defaults(func=_run_lineval)

    p = sub.add_parser("export", help="write the backbone as a torchvision resnet state_dict", formatter_class=fmt)
    p.add_argument("run", help="run folder or checkpoint")
    p.add_argument("--out", required=True, help="output .pth")
    p.add_argument("--arch", default=None,
                   help="torchvision ResNet name; unset: the checkpoint's (an exported backbone does not name its own)")
    p.set_defaults(func=_run_export)

    p = sub.add_parser("report", help="render PNG plots (loss, lr, throughput, data wait) of a run", formatter_class=fmt)
    p.add_argument("run", help="run folder holding metrics.jsonl")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: RUN/plots)")
    p.set_defaults(func=_run_report)


# Evaluation handlers import lazily: `mveb --help` should not pay for torchvision and matplotlib.
def _run_knn(args: argparse.Namespace) -> int:
    from train.knn import run_knn

    run_knn(args)
    return 0


def _run_lineval(args: argparse.Namespace) -> int:
    from train.lineval import run_lineval
    from train.lineval_state import Preempted

    try:
        run_lineval(args)
    except Preempted as e:
        # Unlike pretraining, whose preempted run still leaves a usable checkpoint, a preempted
        # lineval has no result: a non-zero status keeps `&&` chains and afterok dependencies
        # from going on without one. 128 + signal is what a shell reports for a signal.
        sys.stderr.write(f"{e}\n")
        return 128 + e.signal
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from train.export import export_backbone

    print(export_backbone(args.run, args.out, args.arch))
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from train.report import render_report, summarize

    print(summarize(args.run))
    for path in render_report(args.run, args.out):
        print(path)
    return 0


def _run_pretrain(args: argparse.Namespace) -> int:
    from train.config import check_flag_conflicts, get_config
    from train.pretrain import pretrain

    # The flags are overrides like any other. --batch-size is per process: it replaces a global
    # batch that a run's config.json may carry.
    flags = {"data.path": ("--data", args.data), "run.out": ("--out", args.out), "schedule.steps": ("--steps", args.steps),
             "schedule.epochs": ("--epochs", args.epochs), "data.batch_size": ("--batch-size", args.batch_size),
             "data.global_batch_size": ("--batch-size", None if args.batch_size is None else "none"),
             "data.loader": ("--loader", args.loader),
             "run.resume": ("--resume", None if args.resume == "auto" else args.resume)}
    check_flag_conflicts(args.overrides, flags)
    overrides = [f"{k}={v}" for k, (_, v) in flags.items() if v is not None] + list(args.overrides)
    summary = pretrain(get_config(args.config, overrides))
    if summary["rank"] == 0:
        print(f"step {summary['step']}  loss {summary['loss']}  run {summary['run_dir']}"
              + ("  (preempted: rerun to resume)" if summary["preempted"] else ""))
    return 0
