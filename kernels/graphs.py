"""CUDA graphs of a fixed-shape function: one replay instead of ~25 kernel launches.

At B <= 512 the loss forward is a chain of small kernels whose GPU time is well under the
host's cost of launching them one by one from Python (Triton's launcher, torch dispatch),
so the measured time is the host's. A captured graph replays the whole chain with one call.

`GraphCache.run(key, fn, inputs)` captures fn on the first call for a key (after one eager
warm-up on a side stream, which also compiles the Triton kernels), then copies the inputs
into the graph's static buffers and replays. The outputs are the graph's static buffers:
the next replay for the same key overwrites them, so the caller clones what must outlive
that. fn must not sync with the host (a sync is not allowed while capturing); a capture
that fails raises GraphCaptureError, so the caller can go on without graphs.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable

import torch


class GraphCaptureError(RuntimeError):
    """CUDA refused to capture the function (the eager path still works)."""


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]


class GraphCache:
    """Up to `size` captured graphs, least recently used dropped first (each holds its
    intermediates in a private memory pool)."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._graphs: OrderedDict[Hashable, _Captured] = OrderedDict()

    def run(
        self, key: Hashable, fn: Callable[..., tuple[torch.Tensor, ...]], inputs: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, ...]:
        entry = self._graphs.get(key)
        if entry is None:
            entry = _capture(fn, inputs)
            self._graphs[key] = entry
            while len(self._graphs) > self.size:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        for static, x in zip(entry.inputs, inputs):
            static.copy_(x)
        entry.graph.replay()
        return entry.outputs


def _capture(fn: Callable[..., tuple[torch.Tensor, ...]], inputs: tuple[torch.Tensor, ...]) -> _Captured:
    device = inputs[0].device
    with torch.cuda.device(device):
        static = tuple(x.detach().clone(memory_format=torch.contiguous_format) for x in inputs)
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            fn(*static)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: a DataLoader's pin-memory thread may call CUDA while this thread captures.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = fn(*static)
        except RuntimeError as e:
            raise GraphCaptureError(str(e)) from e
    return _Captured(graph, static, tuple(outputs))
