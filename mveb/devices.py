"""One reading of `--device` and `--dtype` options, shared by every subcommand."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ContextManager

import torch

from mveb.errors import UsageError


# Names of the dtypes a command may be asked for: fp32, or an AMP dtype.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so wall clocks measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_stream(device: torch.device, high_priority: bool) -> ContextManager[Any]:
    """Make a high-priority CUDA stream current (a no-op on the CPU or when off).

    A GPU loader (DALI) runs its kernels on its own streams, beside the training step's: with
    the step's stream at a higher priority the GPU schedules the step's blocks first and the
    loader's fill the gaps, instead of both slowing down. Whether that keeps the loader fed
    is for `mveb bench step --priority-stream` to show.
    """
    if not high_priority or device.type != "cuda":
        return nullcontext()
    return torch.cuda.stream(torch.cuda.Stream(device, priority=-1))  # lower number, higher priority


def resolve_device(name: str) -> torch.device:
    """auto (CUDA when present, else CPU), cpu, cuda or cuda:N; a one-line UsageError otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from e
    if device.type not in ("cpu", "cuda"):  # torch names mps, xla, meta...: this trainer runs on neither
        raise UsageError(f"device {name!r} is not supported (use auto, cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name} requested but CUDA is not available here (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 and up")
    return device
