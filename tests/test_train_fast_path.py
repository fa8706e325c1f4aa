"""The fast path on this machine's CPU: channels_last with no hidden format conversion, and the
compiled step (online and momentum backbones) computing what the eager step computes."""

from __future__ import annotations

import collections
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mveb.bench_step import synthetic_batch
from train.config import get_config
from train.distributed import DistInfo
from train.step import Trainer

CPU = DistInfo(0, 1, 0, torch.device("cpu"), False)


def _trainer(*extra: str) -> tuple[Trainer, Any]:
    torch.manual_seed(0)
    cfg = get_config("demo", ["data.batch_size=4", "data.global_size=32", "data.local_size=16", *extra])
    return Trainer(cfg, CPU, 10), cfg


class ImageLayouts(TorchDispatchMode):
    """Counts, per aten op, image tensors (4-D, several channels and pixels) that an op reads
    or writes in a layout other than channels_last. Views are skipped: they move no data."""

    def __init__(self) -> None:
        super().__init__()
        self.convolutions = 0
        self.nchw: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default):
            self.convolutions += 1
            self._check(func, args[:2])
        if not func.is_view:
            self._check(func, out if isinstance(out, (tuple, list)) else [out])
        return out

    def _check(self, func: Any, tensors: Any) -> None:
        for t in tensors:
            if (isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[1] > 1 and t.shape[2] * t.shape[3] > 1
                    and not t.is_contiguous(memory_format=torch.channels_last)):
                self.nchw[str(func)] += 1


def test_step_keeps_every_image_tensor_channels_last() -> None:
    trainer, cfg = _trainer()
    batch = synthetic_batch(cfg, torch.device("cpu"), torch.float32)
    trainer.step(batch, 0)
    with ImageLayouts() as layouts:
        trainer.step(batch, 1)
    # Forward and backward of the online backbone (2 resolutions) and the momentum forward.
    assert layouts.convolutions > 3 * 20
    assert not layouts.nchw, f"ops that read or wrote NCHW image tensors: {dict(layouts.nchw)}"


def test_layout_check_sees_an_nchw_batch() -> None:
    trainer, cfg = _trainer()
    batch = synthetic_batch(cfg, torch.device("cpu"), torch.float32)
    with ImageLayouts() as layouts:
        trainer.online.backbone(batch.global_views.contiguous())
    assert layouts.nchw["aten.convolution.default"] >= 1


@pytest.mark.slow
def test_compiled_step_matches_eager_step() -> None:
    """Three steps on the same batch: the compiled trainer's losses and momentum outputs match
    the eager ones, and steps after the first compile nothing new."""
    from torch._dynamo.utils import counters

    results = {}
    for compiled in (False, True):
        trainer, cfg = _trainer(f"precision.compile={str(compiled).lower()}")
        torch.manual_seed(1)
        batch = synthetic_batch(cfg, torch.device("cpu"), torch.float32)
        losses = [float(trainer.step(batch, 0)["loss"])]
        graphs = counters["stats"]["unique_graphs"]
        losses += [float(trainer.step(batch, s)["loss"]) for s in (1, 2)]
        if compiled:
            assert counters["stats"]["unique_graphs"] == graphs, "a later step recompiled"
        with torch.no_grad():
            x = batch.global_views[: 2 * cfg.data.batch_size]
            results[compiled] = (losses, trainer.momentum([x])[0], trainer.online([x])[0])
    (eager_losses, eager_momentum, eager_online), (comp_losses, comp_momentum, _) = results[False], results[True]
    assert comp_losses == pytest.approx(eager_losses, rel=1e-4)
    # The momentum copy runs its own (EMA) weights, not the online ones it was copied from.
    assert torch.allclose(comp_momentum, eager_momentum, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(eager_momentum, eager_online, rtol=1e-3, atol=1e-4)
