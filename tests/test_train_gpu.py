"""The CUDA paths of the trainer: bf16 and fp16 steps, phase timing with CUDA events, compile, the loop with its kNN monitor."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline.batch import MultiCropBatch
from train.config import get_config
from train.distributed import DistInfo
from train.phases import PHASES, PhaseTimer
from train.step import Trainer

pytestmark = pytest.mark.gpu

SMALL = ["data.batch_size=32", "data.global_size=64", "data.local_size=32", "model.proj_hidden=256",
         "model.proj_dim=256"]


def _batch(cfg, dtype: torch.dtype) -> MultiCropBatch:
    r, B = cfg.data.recipe(), cfg.data.batch_size
    g = torch.randn(r.n_global * B, 3, r.global_size, r.global_size, device="cuda", dtype=dtype)
    loc = torch.randn(r.n_local * B, 3, r.local_size, r.local_size, device="cuda", dtype=dtype)
    return MultiCropBatch(g.contiguous(memory_format=torch.channels_last),
                          loc.contiguous(memory_format=torch.channels_last), None)


def _trainer(*extra: str, timer: PhaseTimer | None = None) -> tuple[Trainer, object]:
    cfg = get_config("demo", SMALL + list(extra))
    return Trainer(cfg, DistInfo(0, 1, 0, torch.device("cuda", 0), False), 10, timer), cfg


@pytest.mark.parametrize("amp,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", None)])
def test_cuda_steps_update_weights(amp: str, dtype: torch.dtype | None) -> None:
    trainer, cfg = _trainer(f"precision.amp={amp}", "loss.impl=auto")
    assert trainer.amp == dtype
    assert (trainer.scaler is not None) == (amp == "fp16")
    before = trainer.online.projector[0].weight.detach().clone()
    for step in range(4):
        out = trainer.step(_batch(cfg, dtype or torch.float32), step)
        assert math.isfinite(float(out["loss"]))
    # GradScaler starts at 2^16 and may overflow (and skip) a step or two while it calibrates.
    assert trainer.skipped_steps <= (2 if amp == "fp16" else 0)
    assert not torch.equal(before, trainer.online.projector[0].weight)
    assert trainer.online.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_cuda_phase_timer_sees_every_phase() -> None:
    timer = PhaseTimer("cuda", enabled=True)
    trainer, cfg = _trainer(timer=timer)
    batch = _batch(cfg, torch.bfloat16)
    for step in range(2):
        with timer("data_wait"):
            pass
        trainer.step(batch, step)
    totals = timer.totals()
    assert set(totals) == set(PHASES)
    assert totals["backward"] > 0 and totals["forward_global"] > 0


def test_per_view_and_grouped_agree_on_shapes_and_finiteness() -> None:
    for mode in ("true", "false"):
        torch.manual_seed(0)
        trainer, cfg = _trainer(f"model.per_view_forward={mode}")
        out = trainer.step(_batch(cfg, torch.bfloat16), 0)
        assert math.isfinite(float(out["loss"])) and not out["skipped"]


@pytest.mark.slow
def test_compiled_backbone_step() -> None:
    trainer, cfg = _trainer("precision.compile=true")
    out = trainer.step(_batch(cfg, torch.bfloat16), 0)
    assert math.isfinite(float(out["loss"]))
    assert all(k.startswith(("backbone.", "projector.")) for k in trainer.state_dict()["model"])


def test_step_on_a_priority_stream() -> None:
    from mveb.devices import step_stream

    trainer, cfg = _trainer()
    with step_stream(torch.device("cuda", 0), True):
        assert torch.cuda.current_stream().priority < torch.cuda.default_stream().priority
        out = trainer.step(_batch(cfg, torch.bfloat16), 0)
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    assert math.isfinite(float(out["loss"])) and not out["skipped"]


def test_cuda_step_keeps_every_image_tensor_channels_last() -> None:
    """Under bf16 autocast on CUDA (cuDNN picks the kernels): no op reads or writes an NCHW image."""
    from test_train_fast_path import ImageLayouts

    trainer, cfg = _trainer()
    batch = _batch(cfg, torch.bfloat16)
    trainer.step(batch, 0)
    with ImageLayouts() as layouts:
        trainer.step(batch, 1)
    assert layouts.convolutions > 3 * 20
    assert not layouts.nchw, f"ops that read or wrote NCHW image tensors: {dict(layouts.nchw)}"


def test_cuda_pretrain_with_the_knn_monitor(photo_root: Path, tmp_path: Path) -> None:
    """The whole loop on the GPU with bf16 steps and the kNN monitor between epochs (fp32
    features of the live channels_last backbone, then the next bf16 step)."""
    import json

    from train.pretrain import pretrain

    run = tmp_path / "run"
    cfg = get_config("demo", SMALL + [f"data.path={photo_root / 'train'}", f"run.out={run}", "data.workers=2",
                                      "schedule.epochs=2", "schedule.warmup_epochs=1", "run.progress=false",
                                      "monitor.knn_every_epochs=1", f"monitor.knn_train={photo_root / 'train'}",
                                      f"monitor.knn_val={photo_root / 'val'}"])
    summary = pretrain(cfg)
    per_epoch = len(list((photo_root / "train").rglob("*.jpg"))) // cfg.data.batch_size
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    knn = [r for r in records if "knn_top1" in r]
    assert summary["step"] == 2 * per_epoch and [r["step"] for r in knn] == [per_epoch, 2 * per_epoch]
    assert all(0 <= r["knn_top1"] <= 100 for r in knn) and math.isfinite(summary["loss"])
