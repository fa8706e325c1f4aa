"""Arguments of `mveb bench kernels`."""

from __future__ import annotations

import argparse


def add_bench_kernels_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--batch-sizes", default=None,
                   help="comma-separated B values (default 128,256,512,1024,4096 on CUDA, 128,256,512 on CPU)")
    p.add_argument("--dim", type=int, default=2048, help="projector width D")
    p.add_argument("--views", type=int, default=8, help="number of views V (2 global + the locals)")
    p.add_argument("--impls", default="reference-literal,reference,torch,triton,triton-cholesky,triton-solve,triton-eager",
                   help="implementations to time (triton-cholesky: cuSOLVER's Cholesky, not the sweep; triton-solve: "
                        "the per-view Cholesky solve at every B; triton-eager: no CUDA graph)")
    p.add_argument("--dtype", default="fp32", help="input dtype: fp32, bf16 or fp16")
    p.add_argument("--seconds", type=float, default=1.0,
                   help="time each case for about this long (at least 3 steps on GPU, 2 on CPU)")
    p.add_argument("--json", default=None, help="write results as JSON here")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from kernels.bench import run_bench_kernels

    return run_bench_kernels(args)
