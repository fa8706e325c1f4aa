"""`mveb bench loader|kernels|step|all`: where the time goes, side by side in one run."""

from __future__ import annotations

import argparse
from typing import Callable


AddArgs = Callable[[argparse.ArgumentParser], None]


def register(sub: argparse._SubParsersAction, *, loader: AddArgs, kernels: AddArgs) -> None:
    p = sub.add_parser("bench", help="throughput benchmarks: loader, kernels, step, all")
    bsub = p.add_subparsers(dest="bench", metavar="WHAT", parser_class=type(p))
    bsub.required = True
    fmt = argparse.ArgumentDefaultsHelpFormatter
    loader(bsub.add_parser("loader", help="images/s per input pipeline backend", formatter_class=fmt))
    kernels(bsub.add_parser("kernels", help="MVEB loss ms and memory per implementation", formatter_class=fmt))
    add_step_args(bsub.add_parser("step", help="training-step samples/s with a per-phase breakdown", formatter_class=fmt))
    a = bsub.add_parser("all", help="loader, kernels and step in one run: markdown table, JSON, PNG", formatter_class=fmt)
    a.add_argument("--device", default="auto")
    a.add_argument("--data", default=None, help="ImageFolder for the loader benchmarks (default: the demo set)")
    a.add_argument("--out", default="bench-results", help="folder for summary.md, results.json, chart.png")
    a.add_argument("--parts", default="loader,kernels,step",
                   help="which parts to run; the others are kept from an earlier results.json in --out")
    a.add_argument("--no-compile", action="store_true",
                   help="on CUDA, time only the eager step (skips the compiled step and its minutes of compiling)")
    a.set_defaults(func=_bench_all)


def add_step_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--batch-size", type=int, default=None, help="per-GPU batch (default 256 on CUDA, 8 on CPU)")
    p.add_argument("--loader", default="synthetic", help="synthetic, ffcv, dali, torch or a comma list")
    p.add_argument("--data", default=None, help="ImageFolder for the real loaders")
    p.add_argument("--compile", action="store_true", help="also time the step with the backbones compiled, and feed the loaders to that one")
    p.add_argument("--priority-stream", action="store_true",
                   help="also feed each loader to the step run on a high-priority CUDA stream")
    p.add_argument("--steps", type=int, default=None, help="timed steps")
    p.add_argument("--config", default=None,
                   help="model and recipe preset (imagenet_rn50, demo; default: imagenet_rn50 on CUDA, demo on "
                        "CPU), or a run's config.json to time that run's step")
    p.add_argument("--no-official", action="store_true", help="skip the official-style baseline")
    p.add_argument("--fp16", action="store_true",
                   help="also time the step under fp16 autocast and a GradScaler (CUDA; the preset's is bf16)")
    p.add_argument("--profile", action="store_true",
                   help="profile 2 more steps per variant: device time by kind of work (convolution, batchnorm, ...)")
    p.add_argument("--trace", default=None, metavar="DIR",
                   help="with --profile: each variant's profiled steps as a Chrome trace in DIR (host and device "
                        "timeline; implies --profile)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every variant, e.g. --set data.workers=16 (repeatable)")
    p.add_argument("--json", default=None, help="write results as JSON here")
    p.set_defaults(func=_bench_step)


def _bench_step(args: argparse.Namespace) -> int:
    from mveb.bench_step import main

    return main(args)


def _bench_all(args: argparse.Namespace) -> int:
    from mveb.bench_all import main

    return main(args)
