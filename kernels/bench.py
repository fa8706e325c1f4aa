"""`mveb bench kernels`: ms per loss step (forward + backward, all views) and peak memory
for each implementation, side by side in one run.

GPU: CUDA events, peak = torch.cuda.max_memory_allocated above the inputs, and the host's
launch and sync calls in one profiled step. CPU: wall
clock, peak = the rise of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) during one step, with glibc told to map every large block
afresh (mallopt), so freed memory is returned and the rise is the step's own. The literal B x B x D form is skipped where that
tensor alone would not fit the memory budget, and Triton where there is no GPU; the table
says so.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from tqdm import tqdm

from kernels import mveb_loss
from mveb.bench import exit_status, one_line, outcomes
from mveb.devices import DTYPES, resolve_device
from mveb.errors import UsageError
from mveb.files import check_writable, write_atomic

# Variants of the Triton path, to see what each choice is worth at each B:
# triton-cholesky: cuSOLVER's Cholesky and a B-wide inverse instead of the sweep;
# triton-solve: the per-view Cholesky solve against diag(r) Z at every B (default from B=2048);
# triton-eager: no CUDA graph (every kernel launched from Python).
TRITON_VARIANTS = {"triton-cholesky": {"sweep_max_b": 0}, "triton-solve": {"solve_min_b": 2},
                   "triton-eager": {"graphs": False}}
BENCH_IMPLS = ("reference-literal", "reference", "torch", "triton", *TRITON_VARIANTS)
# Host calls that start device work, and host calls that wait for the device.
LAUNCH_CALLS = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch",
                "cudaMemsetAsync", "cudaMemcpyAsync"}
SYNC_CALLS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"}
CPU_BATCH_SIZES = (128, 256, 512)
CPU_LITERAL_BYTES = 256 << 20
M_MMAP_THRESHOLD = -3


@dataclass
class Result:
    impl: str
    batch: int
    ms: float | None = None
    ms_min: float | None = None
    peak_mib: float | None = None
    steps: int = 0
    launches: int | None = None
    syncs: int | None = None
    gpu_ms: float | None = None
    top_kernels: list[tuple[str, float]] | None = None
    skipped: str | None = None
    error: str | None = None  # the case raised: one line, and the other cases still run
    profile_error: str | None = None  # timed, but the profiler could not run (CUPTI refused)


def run_bench_kernels(args: argparse.Namespace) -> int:
    """Exit code 1 when no case could be measured (all skipped: the table says why)."""
    device = resolve_device(args.device)
    impls = _parse_impls(args.impls)
    batches = _parse_batches(args.batch_sizes, device)
    if args.views < 2 or args.dim < 1:
        raise UsageError(f"--views must be >= 2 and --dim >= 1, got {args.views} and {args.dim}")
    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    check_writable(args.json, "--json")
    results = []
    for b, impl in tqdm([(b, i) for b in batches for i in impls], desc="bench kernels", unit="case"):
        results.append(bench_one(impl, b, args.dim, args.views, DTYPES[args.dtype], device, args.seconds))
    print(format_table(results, device, args))
    report = _report(results, device, args)
    if args.json:
        write_atomic(args.json, json.dumps(report, indent=1))
    return exit_status("kernels", outcomes(report["results"], row_label))


def bench_one(impl: str, b: int, d: int, views: int, dtype: torch.dtype, device: torch.device, seconds: float) -> Result:
    reason = _skip_reason(impl, b, d, device)
    if reason:
        return Result(impl, b, skipped=reason)
    gen = torch.Generator(device="cpu").manual_seed(b)
    online = torch.randn(views, b, d, generator=gen).to(device, dtype).requires_grad_()
    targets = torch.randn(2, b, d, generator=gen).to(device, dtype)

    loss_fn = _loss_fn(impl)

    def step() -> None:
        loss_fn(online, targets).backward()
        online.grad = None

    try:
        step()
        peak = _peak_mib(step, device)
        times = _time(step, device, seconds)
        try:
            profiled = _profile(step, device)
        except RuntimeError as e:  # a shared host may refuse CUPTI: keep the timing
            profiled = {"profile_error": str(e).splitlines()[0][:200]}
    except torch.OutOfMemoryError:
        return Result(impl, b, skipped="out of memory")
    except Exception as e:  # a Triton compile failure at one B must not cost the whole table
        return Result(impl, b, error=one_line(e))
    finally:
        online.grad = None
    return Result(impl, b, ms=statistics.median(times), ms_min=min(times), peak_mib=peak, steps=len(times),
                  **profiled)


def _loss_fn(impl: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if impl not in TRITON_VARIANTS:
        return lambda online, targets: mveb_loss(online, targets, impl=impl)
    from kernels.loss import MvebLossFunction
    from kernels.triton_ops import TritonOps

    ops = TritonOps(**TRITON_VARIANTS[impl])
    return lambda online, targets: MvebLossFunction.apply(online, targets, 0.01, 0.01, 0.1, ops)[0]


def _profile(step: Callable[[], None], device: torch.device) -> dict:
    """One profiled step on CUDA: the host's launch calls and syncs (CUDA API events), the
    GPU's busy time (kernels, copies, fills) and its longest kernels. A step whose ms is far
    above gpu_ms is paying for the host's launches and syncs, not for GPU work."""
    if device.type != "cuda":
        return {}
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
    events = prof.events()
    names = [e.name for e in events]
    gpu = sorted(((e.name, e.time_range.elapsed_us()) for e in events if e.device_type == DeviceType.CUDA),
                 key=lambda x: -x[1])
    return {"launches": sum(n in LAUNCH_CALLS for n in names), "syncs": sum(n in SYNC_CALLS for n in names),
            "gpu_ms": sum(us for _, us in gpu) / 1e3, "top_kernels": [(n[:80], round(us, 1)) for n, us in gpu[:8]]}


def _skip_reason(impl: str, b: int, d: int, device: torch.device) -> str | None:
    if impl.startswith("triton") and device.type != "cuda":
        return "needs CUDA"
    if impl == "reference-literal":
        need = b * b * d * 4
        budget = torch.cuda.get_device_properties(device).total_memory // 2 if device.type == "cuda" else CPU_LITERAL_BYTES
        if need > budget:
            return f"B x B x D tensor alone is {need / 2**30:.2f} GiB (budget {budget / 2**30:.2f} GiB)"
    return None


def _time(step: Callable[[], None], device: torch.device, seconds: float) -> list[float]:
    """Per-step ms until `seconds` have passed (at least 3 steps on GPU, 2 on CPU, at most 200)."""
    times: list[float] = []
    start = time.perf_counter()
    least = 3 if device.type == "cuda" else 2
    while len(times) < least or (time.perf_counter() - start < seconds and len(times) < 200):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            step()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _peak_mib(step: Callable[[], None], device: torch.device) -> float | None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 256 << 10)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    base = _vm_kib("VmRSS")
    step()
    return (_vm_kib("VmHWM") - base) / 1024


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise UsageError(f"/proc/self/status has no {field}: peak memory on CPU needs Linux")


def format_table(results: list[Result], device: torch.device, args: argparse.Namespace) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    lines = [f"MVEB loss fwd+bwd, {args.views} views, D={args.dim}, {args.dtype} inputs, {name}",
             "| B | impl | ms/step (median) | ms (min) | peak MiB | vs reference | GPU busy ms | launches | syncs | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    ref = {r.batch: r.ms for r in results if r.impl == "reference" and r.ms}
    for r in results:
        if r.skipped:
            lines.append(f"| {r.batch} | {r.impl} | - | - | - | - | - | - | - | skipped: {r.skipped} |")
            continue
        if r.error:
            lines.append(f"| {r.batch} | {r.impl} | - | - | - | - | - | - | - | failed: {r.error} |")
            continue
        speed = f"{ref[r.batch] / r.ms:.2f}x" if r.batch in ref else "-"
        peak = f"{r.peak_mib:.0f}" if r.peak_mib is not None else "n/a"
        gpu = "-" if r.gpu_ms is None else f"{r.gpu_ms:.3f}"
        calls = " | ".join("-" if c is None else str(c) for c in (gpu, r.launches, r.syncs))
        note = f"{r.steps} steps" + (f"; not profiled: {r.profile_error}" if r.profile_error else "")
        lines.append(f"| {r.batch} | {r.impl} | {r.ms:.3f} | {r.ms_min:.3f} | {peak} | {speed} | {calls} | {note} |")
    lines.append("GPU busy ms: kernel, copy and fill time of one profiled step; launches / syncs: host calls per "
                 "step that start device work (kernels, graph replays, copies, fills) / that wait for the device "
                 "(CUDA only; the JSON lists each case's longest kernels).")
    return "\n".join(lines)


def _report(results: list[Result], device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    return {"bench": "kernels", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "views": args.views, "dim": args.dim, "dtype": args.dtype, "torch": torch.__version__,
            "results": [asdict(r) for r in results]}


def row_label(row: dict[str, Any]) -> str:
    return f"{row['impl']} B={row['batch']}"


def _parse_impls(text: str) -> list[str]:
    impls = [s.strip() for s in text.split(",") if s.strip()]
    bad = [i for i in impls if i not in BENCH_IMPLS]
    if bad or not impls:
        raise UsageError(f"--impls takes a comma list of {', '.join(BENCH_IMPLS)}, got {text!r}")
    return impls


def _parse_batches(text: str | None, device: torch.device) -> list[int]:
    if text is None:
        return list(CPU_BATCH_SIZES) if device.type == "cpu" else [128, 256, 512, 1024, 4096]
    try:
        batches = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 2:
        raise UsageError(f"--batch-sizes takes a comma list of integers >= 2, got {text!r}")
    return batches

