"""`mveb bench loader`: images/s of each loader backend, side by side in one run.

One image is one sample with all its views. Per backend, in this order and apart:
setup (the FFCV shard, built or found in the cache), compile (construction to the first
batch: worker start, numba JIT, DALI pipeline build), a short warm-up that drains what the
workers prefetched while we waited, then `seconds` of timed batches, crossing epochs as
needed. Images per CPU-second (this process and its workers) are reported beside images/s:
on a busy shared machine they still compare backends fairly. A backend that is not
installed, or fails, is reported with the reason and the others still run.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from mveb.bench import exit_status, one_line, outcomes
from mveb.devices import DTYPES, resolve_device, synchronize
from mveb.errors import UsageError
from mveb.files import check_writable, write_atomic

from .images import usable_cpus
from .loaders import BACKENDS, build_loader, check_data, dali_tuning_for, loader_class
from .recipe import DEFAULT_RECIPE, MultiCropRecipe


def tree_cpu_s() -> float | None:
    """CPU seconds used so far by this process, its live descendants (loader workers) and
    its reaped children; None where /proc is missing. Divided into the images of a timed
    window it gives images per CPU-second, which a shared, busy machine does not distort."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        procs: dict[int, tuple[int, float]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue  # exited while we looked
            fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, ..., utime (11), stime (12)
            procs[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    except (OSError, ValueError, AttributeError):
        return None
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [os.getpid()]
    while todo:
        pid = todo.pop()
        total += procs.get(pid, (0, 0.0))[1]
        todo += children.get(pid, [])
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return total + reaped.ru_utime + reaped.ru_stime


def _prepare_data(backend: str, data: str, workers: int | None) -> str:
    """What the backend reads; for FFCV the cached shard, built here outside any timing."""
    if backend == "ffcv" and not data.endswith(".beton"):
        from .ffcv_loader import cached_shard

        return str(cached_shard(data, workers=workers))
    return data


def bench_backend(backend: str, data: str, recipe: MultiCropRecipe, batch_size: int, workers: int | None,
                  seconds: float, device: torch.device, warmup_s: float,
                  dtype: torch.dtype = torch.float32, dali_tuning: str = "") -> dict[str, Any]:
    row: dict[str, Any] = {"backend": backend}
    try:
        loader_class(backend)
    except UsageError as e:
        return {**row, "skipped": str(e)}
    try:
        t = time.perf_counter()
        source = _prepare_data(backend, data, workers)
        row["setup_s"] = round(time.perf_counter() - t, 3)

        t = time.perf_counter()
        loader = build_loader(backend, source, recipe, batch_size, device=device, dtype=dtype, seed=0, workers=workers,
                              dali_tuning=dali_tuning if backend == "dali" else "")
        batches = iter(loader)
        next(batches)
        synchronize(device)
        row["compile_s"] = round(time.perf_counter() - t, 3)

        def next_batch() -> None:
            nonlocal batches
            try:
                next(batches)
            except StopIteration:  # next epoch: the loader advanced itself
                batches = iter(loader)
                next(batches)

        t = time.perf_counter()
        while time.perf_counter() - t < warmup_s:
            next_batch()
        synchronize(device)
        n, t, cpu = 0, time.perf_counter(), tree_cpu_s()
        while time.perf_counter() - t < seconds:
            next_batch()
            n += 1
        synchronize(device)
        elapsed = time.perf_counter() - t
        cpu_end = tree_cpu_s()
    except UsageError as e:  # e.g. a .beton given to a backend that reads folders
        return {**row, "skipped": str(e)}
    except Exception as e:  # noqa: BLE001 - one broken backend must not hide the others' numbers
        traceback.print_exc()
        return {**row, "error": one_line(e)}
    images = n * batch_size
    if cpu is not None and cpu_end is not None and cpu_end > cpu:
        row.update(cpu_s=round(cpu_end - cpu, 2), images_per_cpu_s=round(images / (cpu_end - cpu), 2))
    return {**row, "images_per_s": round(images / elapsed, 2), "views_per_s": round(images * recipe.n_views / elapsed, 1),
            "batches": n, "images": images, "timed_s": round(elapsed, 3), "warmup_s": warmup_s}


def bench_loaders(data: str | Path, backends: list[str], batch_size: int = 64, workers: int | None = None,
                  seconds: float = 20.0, device: str = "cpu", recipe: MultiCropRecipe = DEFAULT_RECIPE,
                  warmup_s: float | None = None, dtype: str = "fp32", dali_tuning: str = "") -> dict[str, Any]:
    """{"results": [{"backend", "images_per_s", "compile_s", ...}], ...} for `backends` on `data`.
    dali_tuning: "key=value,..." for the dali backend (pipeline.dali_graph.DALITuning), so a sweep
    over its settings is a loop over this command."""
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise UsageError(f"unknown backend(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(BACKENDS)}")
    if not 0 < seconds < math.inf or batch_size < 1:
        raise UsageError("--seconds must be positive and --batch-size at least 1")
    if workers is not None and workers < 0:
        raise UsageError(f"--workers must be 0 (torch: decode in this process) or more (unset: one per CPU), got {workers}")
    dev = resolve_device(device)
    data = str(data)
    check_data("torch" if not data.endswith(".beton") else "ffcv", data)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}; use {', '.join(DTYPES)}")
    if dali_tuning and "dali" not in backends:
        raise UsageError(f"--dali-tuning {dali_tuning!r} without the dali backend in --backends")
    if dali_tuning:  # a bad setting (or asking to tune an absent DALI) is a one-line error, not a failed row
        dali_tuning_for("dali", dali_tuning)
    warmup_s = min(5.0, seconds / 4) if warmup_s is None else warmup_s
    results = [bench_backend(b, data, recipe, batch_size, workers, seconds, dev, warmup_s, DTYPES[dtype], dali_tuning)
               for b in backends]
    return {"results": results, "data": data, "device": str(dev), "dtype": dtype, "batch_size": batch_size,
            "dali_tuning": dali_tuning,
            "workers": workers or usable_cpus(), "cpu_count": os.cpu_count(), "seconds": seconds,
            "views": f"{recipe.n_global}x{recipe.global_size}+{recipe.n_local}x{recipe.local_size}",
            "recipe": recipe.to_dict()}


def format_table(report: dict[str, Any]) -> str:
    lines = [f"loader benchmark: {report['views']} views, batch {report['batch_size']}, {report['workers']} workers, "
             f"device {report['device']}",
             f"{'backend':8} {'images/s':>9} {'views/s':>9} {'img/CPU-s':>10} {'compile s':>10} {'setup s':>8}  note"]
    for r in report["results"]:
        if "images_per_s" in r:
            per_cpu = f"{r['images_per_cpu_s']:10.1f}" if "images_per_cpu_s" in r else f"{'-':>10}"
            lines.append(f"{r['backend']:8} {r['images_per_s']:9.1f} {r['views_per_s']:9.0f} {per_cpu} "
                         f"{r['compile_s']:10.1f} {r['setup_s']:8.1f}")
        else:
            lines.append(f"{r['backend']:8} {'-':>9} {'-':>9} {'-':>10} {'-':>10} {'-':>8}  "
                         f"{r.get('skipped') or r.get('error')}")
    return "\n".join(lines)


def row_label(row: dict[str, Any]) -> str:
    return row["backend"]


def bench_loader_command(data: str, backends: str, batch_size: int, workers: int | None, seconds: float,
                         device: str, json_path: str | None, dtype: str = "fp32", dali_tuning: str = "") -> int:
    """Exit code 1 when no backend could be measured (the table says why each could not)."""
    check_writable(json_path, "--json")
    report = bench_loaders(data, [b.strip() for b in backends.split(",") if b.strip()], batch_size, workers,
                           seconds, device, dtype=dtype, dali_tuning=dali_tuning)
    print(format_table(report))
    if json_path:
        write_atomic(json_path, json.dumps(report, indent=1) + "\n")
    return exit_status("loader", outcomes(report["results"], row_label))
