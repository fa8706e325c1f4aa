"""Where a step's device time goes, by kind of work, from the torch profiler.

    work = profile_steps(step, device, steps=2)
    # {"wall_ms", "busy_ms", "kinds": {"convolution": ms, ...}, "calls": {...}, "top": [...]}, per step

On CUDA the work items are the device's kernels, copies and fills (every stream, so a GPU
loader's kernels count too: they compete with the step); busy_ms is the union of their
intervals, so overlapping streams are not counted twice. On a CPU they are the aten ops' self
times. Kinds come from names: a big "batchnorm" or "elementwise" share is fusion a compiler
could do; "layout" (cuDNN's NCHW <-> NHWC kernels) or a large "copy" is a hidden format
conversion; "loader" is the DALI pipeline's share of the GPU.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from mveb.devices import synchronize

# First match wins, on the lowercased name up to its template or argument list (a kernel's full
# signature names functors and types that say nothing of its kind); kernel names (CUDA) and aten
# op names (CPU) alike. Convolutions alone are matched on the whole name: cuDNN's cutlass
# kernels say fprop / dgrad / wgrad only inside their template arguments.
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("layout", ("nchwtonhwc", "nhwctonchw", "converttensor")),
    ("communication", ("nccl", "allreduce", "all_reduce", "all_to_all", "gloo")),
    ("loader", ("dali", "nvjpeg", "nvimgcodec")),
    # kernels/triton_kernels.py's kernels (a test keeps this list complete) and the torch path's solver
    ("loss", ("normalize_align_kernel", "radix_pass_kernel", "kernel_matrix_kernel", "operator_kernel",
              "finish_kernel", "grad_online_kernel", "sweep_step_kernel", "potrf", "trsm", "cholesky",
              "cusolver", "kthvalue", "sort")),
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "implicit_gemm", "winograd")),
    ("batchnorm", ("batch_norm", "batchnorm", "bn_fw", "bn_bw", "welford")),
    ("convolution", ("cudnn",)),  # cuDNN's other helpers (weight-gradient packing, ...)
    ("matmul", ("gemm", "gemv", "nvjet", "cublas", "addmm", "aten::mm", "aten::bmm", "matmul", "cutlass",
                "triton_tem")),  # torch.compile max-autotune templates; its conv ones matched above
    ("foreach (optimizer, EMA)", ("multi_tensor", "foreach", "fused_sgd", "lerp", "lpnorm")),
    ("pooling", ("pool",)),
    ("copy", ("memcpy", "memset", "copy", "fill", "zero_", "aten::cat", "aten::stack", "clone")),
    ("reduction", ("reduce", "aten::sum", "aten::mean", "aten::norm", "vector_norm", "aten::max", "aten::min",
                   "aten::amax")),
    ("elementwise", ("elementwise", "vectorized", "relu", "threshold", "add", "mul", "div", "sub", "where",
                     "exp", "clamp", "neg", "pow", "sqrt")),
)
FULL_NAME_KINDS = {"convolution"}
OTHER = "other"


def kind_of(name: str) -> str:
    full = name.lower()
    head = full.split("<", 1)[0].split("(", 1)[0]
    if head.startswith("triton_") and not head.startswith("triton_tem"):
        # torch.compile's kernels, named after every op they fuse (a bf16 one names its casts,
        # `_to_copy`): the prefix says pointwise or reduction, and a fused batchnorm is batchnorm.
        if "batch_norm" in head:
            return "batchnorm"
        return "elementwise" if head.startswith("triton_poi") else "reduction"
    for kind, keys in KINDS:
        text = full if kind in FULL_NAME_KINDS else head
        if any(k in text for k in keys):
            return kind
    return OTHER


def profile_steps(step: Callable[[], None], device: torch.device, steps: int = 1,
                  trace: str | Path | None = None) -> dict[str, Any]:
    """Run `step` `steps` times under the profiler; work_by_kind of what the device did.
    trace: also write those steps' timeline there (Chrome trace format, for Perfetto or
    chrome://tracing), host ops included, to see where the device waits for the host."""
    cpu, cuda = torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA
    # On CUDA only the device's activity unless a timeline is asked for: host ops would
    # multiply the events to process.
    acts = [cpu] if device.type != "cuda" else [cuda, cpu] if trace else [cuda]
    synchronize(device)
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        wall_ms = 1e3 * (time.perf_counter() - t0)
    if trace:
        prof.export_chrome_trace(str(trace))
    return work_by_kind(prof.events(), device, wall_ms, steps)


def _work_items(events: Iterable[Any], device: torch.device) -> list[tuple[str, float, float, float]]:
    """(name, start_us, end_us, us) per unit of device work."""
    from torch.autograd import DeviceType

    if device.type == "cuda":
        return [(e.name, e.time_range.start, e.time_range.end, e.time_range.elapsed_us())
                for e in events if e.device_type == DeviceType.CUDA]
    return [(e.name, e.time_range.start, e.time_range.end, e.self_cpu_time_total)
            for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")]


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def work_by_kind(events: Iterable[Any], device: torch.device, wall_ms: float, steps: int = 1,
                 top: int = 10) -> dict[str, Any]:
    """Per-step ms of device work by kind, its busy time against the profiled steps' wall time
    (`wall_ms`, all steps), call counts and the longest items."""
    items = _work_items(events, device)
    ms: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    by_name: dict[str, float] = defaultdict(float)
    for name, _, _, us in items:
        kind = kind_of(name)
        ms[kind] += us / 1e3 / steps
        calls[kind] += 1
        by_name[name] += us / 1e3 / steps
    if device.type == "cuda":
        busy = _union_us([(s, e) for _, s, e, _ in items]) / 1e3 / steps
    else:
        busy = sum(ms.values())
    longest = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    return {"wall_ms": wall_ms / steps, "busy_ms": busy, "kinds": dict(sorted(ms.items(), key=lambda kv: -kv[1])),
            "calls": {k: calls[k] // steps for k in ms},
            "top": [{"name": n[:120], "kind": kind_of(n), "ms": v} for n, v in longest]}


def format_kinds(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """A markdown table: one row per (label, work_by_kind result), ms per step; kinds as
    columns, ordered by the first row's time. busy %: of the profiled steps' wall time."""
    if not rows:
        return ""
    kinds = list(rows[0][1]["kinds"])
    kinds += sorted({k for _, w in rows for k in w["kinds"]} - set(kinds))
    cols = ["variant", "profiled step ms", "busy ms", "busy %"] + kinds
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for label, w in rows:
        row = [label, f"{w['wall_ms']:.1f}", f"{w['busy_ms']:.1f}", f"{100 * w['busy_ms'] / w['wall_ms']:.0f}%"]
        row += [f"{w['kinds'].get(k, 0.0):.1f}" for k in kinds]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
