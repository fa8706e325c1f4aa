"""Per-phase timing of a training step, for `mveb bench step`; free when disabled.

    timer = PhaseTimer(device, enabled=True)
    with timer("forward_global"): ...
    timer.totals()  # {"forward_global": seconds, ...} summed over the steps so far

On CUDA a phase is a pair of events read once at the end (no sync inside the step); on CPU
it is perf_counter around the phase.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from typing import ContextManager, Iterator

import torch

PHASES = ("data_wait", "forward_global", "forward_local", "momentum_forward", "loss", "backward", "optimizer", "ema")


class PhaseTimer:
    def __init__(self, device: torch.device | str = "cpu", enabled: bool = False) -> None:
        self.device = torch.device(device)
        self.enabled = enabled
        self._cpu: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def __call__(self, phase: str) -> ContextManager[None]:
        if not self.enabled:
            return nullcontext()
        return self._timed(phase)

    @contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((phase, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._cpu[phase] += time.perf_counter() - t0

    def totals(self) -> dict[str, float]:
        """Seconds per phase since the last reset (synchronizes CUDA once)."""
        out = dict(self._cpu)
        if self._events:
            torch.cuda.synchronize(self.device)
            for phase, start, end in self._events:
                out[phase] = out.get(phase, 0.0) + start.elapsed_time(end) / 1000
        return out

    def reset(self) -> None:
        self._cpu.clear()
        self._events.clear()
