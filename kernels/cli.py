"""Arguments of `mveb bench kernels`."""

from __future__ import annotations

import argparse

from mveb.errors import not_implemented


def add_bench_kernels_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--batch-sizes", default="128,256,512,1024,4096", help="comma-separated B values")
    p.add_argument("--dim", type=int, default=2048, help="projector width D")
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--impls", default="reference-literal,reference,torch,triton", help="implementations to time")
    p.add_argument("--json", default=None, help="write results as JSON here")
    p.set_defaults(func=lambda a: not_implemented("bench kernels"))
