"""Linear evaluation on frozen features of real photos: both the fast (precomputed) and augmented paths."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mveb.cli import main
from train.features import load_backbone
from train.lineval import linear_eval, topk_accuracy


def test_topk_accuracy() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    assert topk_accuracy(logits, torch.tensor([1, 1, 2])) == pytest.approx((200 / 3, 100.0))


def test_precomputed_head_learns_the_photos(photo_root: Path) -> None:
    r = linear_eval(load_backbone(None, "resnet18"), str(photo_root / "train"), str(photo_root / "val"),
                    image_size=32, batch_size=96, epochs=10, lr=0.5, precompute=True, workers=0)
    assert (r["n_train"], r["n_val"], r["num_classes"]) == (288, 96, 12)
    assert math.isfinite(r["train_loss"]) and r["train_loss"] < math.log(12)  # below chance-level loss
    assert 25.0 < r["top1"] <= r["top5"] <= 100.0  # chance is 8.3%


def test_mveb_lineval_one_augmented_epoch(photo_root: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lin.json"
    rc = main(["lineval", "--train", str(photo_root / "train"), "--val", str(photo_root / "val"), "--arch",
               "resnet18", "--image-size", "32", "--batch-size", "96", "--epochs", "1", "--workers", "0",
               "--device", "cpu", "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["epochs"] == 1 and r["precompute"] is False and math.isfinite(r["train_loss"])
    assert 0.0 <= r["top1"] <= r["top5"] <= 100.0
    assert "linear eval 1 epochs, augmented" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.parametrize("precompute", [True, False])
def test_lineval_on_cuda(photo_root: Path, precompute: bool) -> None:
    r = linear_eval(load_backbone(None, "resnet50"), str(photo_root / "train"), str(photo_root / "val"),
                    image_size=96, batch_size=64, epochs=10, lr=0.5, device="cuda", precompute=precompute, workers=4)
    assert math.isfinite(r["train_loss"]) and 0.0 <= r["top1"] <= r["top5"] <= 100.0
    if precompute:
        assert r["top1"] > 25.0  # chance is 8.3%
