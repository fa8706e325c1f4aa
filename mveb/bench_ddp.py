"""`mveb bench step` under torchrun or srun (WORLD_SIZE > 1): what distribution costs a step.

Every rank times the step twice on its own device with the same synthetic batch: as one
process (no communication) and under DDP (the gradient all-reduce in buckets during the
backward, plus SyncBN's collectives on GPUs). The difference is the communication the
backward does not hide, the "exposed communication" of the README's scaling model; rank 0
prints it beside the bytes all-reduced per step.

    torchrun --nproc-per-node 8 -m mveb bench step --batch-size 128 --json ddp.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as torch_dist

from mveb.bench_step import check_counts, format_table, run_variant, step_settings, synthetic_batch
from mveb.errors import UsageError
from mveb.files import check_writable, write_atomic
from train.distributed import DistInfo, cleanup_distributed, init_distributed
from train.step import amp_dtype


def bench_step_ddp(device: str, batch_size: int | None, steps: int | None, config: str | None,
                   compile: bool, profile: bool = False, overrides: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The report on rank 0, None on the other ranks. profile: each row also says what rank 0's
    device did in 2 more steps (under DDP on a GPU, NCCL's kernels are the "communication" kind)."""
    check_counts(batch_size, steps)  # before the rendezvous: every rank says it, none hangs
    info = init_distributed()
    try:
        dev = info.device
        if device not in ("auto", dev.type):
            raise UsageError(f"--device {device}: under torchrun each rank uses {dev} (set by its LOCAL_RANK)")
        on_gpu = dev.type == "cuda"
        cfg, steps, warmup = step_settings(config, batch_size, steps, on_gpu, overrides)
        if compile:
            cfg = replace(cfg, precision=replace(cfg.precision, compile=True))
        batch = synthetic_batch(cfg, dev, amp_dtype(cfg.precision.amp, dev) or torch.float32)
        alone = DistInfo(info.rank, 1, info.local_rank, dev, is_distributed=False)
        rows = []
        for name, dist in (("mveb, one process", alone), (f"mveb, DDP x {info.world_size}", info)):
            torch_dist.barrier()  # every rank starts each variant together
            rows.append(run_variant(name, cfg, dev, itertools.repeat(batch), steps, warmup, dist=dist,
                                    profile=2 * profile))
        per_rank: list[Any] = [None] * info.world_size
        torch_dist.all_gather_object(per_rank, [r["step_ms"] for r in rows])
    finally:
        cleanup_distributed()
    if not info.is_main:
        return None
    for r in rows:
        r["ratio_to_mveb_synthetic"] = r["samples_per_s"] / rows[0]["samples_per_s"]
    return {"device": str(dev), "world_size": info.world_size, "arch": cfg.model.arch, "torch": torch.__version__,
            "backend": "nccl" if on_gpu else "gloo", "results": rows,
            "step_ms_per_rank": per_rank,
            "exposed_comm_ms": statistics.mean(ddp - alone_ms for alone_ms, ddp in per_rank),
            "allreduce_mib_per_step": rows[1]["grad_mib"]}


def main(args: argparse.Namespace) -> int:
    if args.loader != "synthetic" or args.data:
        raise UsageError("under torchrun, bench step times the synthetic step only (drop --loader and --data)")
    if args.fp16 or args.priority_stream or args.trace:
        raise UsageError("under torchrun, bench step times the preset's precision on the default stream, "
                         "without timelines (drop --fp16, --priority-stream and --trace)")
    # On every rank, before the rendezvous, as check_counts: one rank refusing alone would leave
    # the others waiting for it.
    check_writable(args.json, "--json")
    report = bench_step_ddp(args.device, args.batch_size, args.steps, args.config, args.compile, args.profile,
                            tuple(args.set))
    if report is None:
        return 0
    print(f"MVEB step on {report['world_size']} ranks ({report['backend']}, {report['arch']}), ms per step by phase:")
    print(format_table(report))
    print(f"exposed communication: {report['exposed_comm_ms']:.1f} ms per step (DDP step - one-process step, "
          f"mean over ranks); gradient all-reduce: {report['allreduce_mib_per_step']:.0f} MiB per step")
    if args.json:
        write_atomic(args.json, json.dumps(report, indent=2))
    return 0
