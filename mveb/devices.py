"""One reading of a `--device` option, shared by every subcommand."""

from __future__ import annotations

import torch

from mveb.errors import UsageError


def resolve_device(name: str) -> torch.device:
    """auto (CUDA when present, else CPU), cpu, cuda or cuda:N; a one-line UsageError otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name} requested but CUDA is not available here (use --device cpu)")
    return device
