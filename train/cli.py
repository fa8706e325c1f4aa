"""`mveb pretrain|knn|lineval|export|report`."""

from __future__ import annotations

import argparse

from mveb.errors import not_implemented


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("pretrain", help="MVEB pretraining (single process, or one rank under SLURM/torchrun)",
                       formatter_class=fmt)
    p.add_argument("--config", default="imagenet_rn50", choices=["imagenet_rn50", "demo"], help="recipe preset")
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
        p.add_argument("--arch", default="resnet50", help="torchvision ResNet name")
        p.add_argument("--image-size", type=int, default=224)
        p.add_argument("--batch-size", type=int, default=256)
        p.add_argument("--device", default="auto")
        p.add_argument("--json", default=None, help="write the result as JSON here")
        p.set_defaults(func=lambda a, n=name: not_implemented(n))

    p = sub.add_parser("export", help="write the backbone as a torchvision resnet state_dict", formatter_class=fmt)
    p.add_argument("run", help="run folder or checkpoint")
    p.add_argument("--out", required=True, help="output .pth")
    p.set_defaults(func=lambda a: not_implemented("export"))

    p = sub.add_parser("report", help="render PNG plots (loss, lr, throughput, data wait) of a run", formatter_class=fmt)
    p.add_argument("run", help="run folder holding metrics.jsonl")
    p.set_defaults(func=lambda a: not_implemented("report"))

def _run_pretrain(args: argparse.Namespace) -> int:
    from train.config import get_config
    from train.pretrain import pretrain

    # The flags are overrides like any other; explicit key=value pairs come last and win.
    flags = {"data.path": args.data, "run.out": args.out, "schedule.steps": args.steps, "schedule.epochs": args.epochs,
             "data.batch_size": args.batch_size, "data.loader": args.loader, "run.resume": args.resume}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)
    summary = pretrain(get_config(args.config, overrides))
    print(f"step {summary['step']}  loss {summary['loss']}  run {summary['run_dir']}"
          + ("  (preempted: rerun to resume)" if summary["preempted"] else ""))
    return 0
