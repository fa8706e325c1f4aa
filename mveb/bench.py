"""`mveb bench loader|kernels|step|all`: where the time goes, side by side in one run.

Each prints its table and exits 1 when nothing it was asked for could be measured (every row
failed or was skipped; stderr says why in one line); an output path it could not write is a
one-line error before it measures anything.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Iterable


AddArgs = Callable[[argparse.ArgumentParser], None]
# (what was to be measured, why it was not: None when it was)
Outcome = tuple[str, str | None]


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


def one_line(e: BaseException) -> str:
    """`Type: message` on one line, for a table's note. An error raised in a DataLoader worker
    carries the worker's whole traceback as its message: its last line is the original error."""
    text = str(e)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback (most recent call last)" in text:
        return lines[-1][:300]
    return f"{type(e).__name__}: {lines[0]}"[:300] if lines else type(e).__name__


def outcomes(rows: Iterable[dict[str, Any]], label: Callable[[dict[str, Any]], str]) -> list[Outcome]:
    """Each report row as an Outcome: a row not measured says why in "error" (it failed) or
    "skipped" (it cannot run here)."""
    return [(label(r), r.get("error") or r.get("skipped")) for r in rows]


def unmeasured(results: list[Outcome]) -> str | None:
    """None when something was measured; else why nothing was, in one line (each reason once,
    after what it stopped)."""
    if any(why is None for _, why in results):
        return None
    stopped: dict[str, list[str]] = {}
    for what, why in results:
        stopped.setdefault(str(why), []).append(what)
    return "; ".join(f"{', '.join(whats)}: {why}" for why, whats in stopped.items())


def exit_status(command: str, results: list[Outcome]) -> int:
    """0 when something was measured; else 1, with why on stderr (the table, printed before,
    has the rows): a script or a CI job must not take a run that measured nothing for a result."""
    why = unmeasured(results)
    if why is None:
        return 0
    sys.stderr.write(f"mveb bench {command}: nothing measured: {why}\n")
    return 1
