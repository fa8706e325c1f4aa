"""Evaluation reads a labelled FFCV shard (written by `mveb shards`) like the ImageFolder it came from."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mveb.errors import UsageError
from pipeline.shards import build_shard
from train.features import extract_features, load_backbone, open_images


@pytest.mark.slow
def test_shard_features_match_folder_features(photo_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("ffcv")
    beton = tmp_path / "val.beton"
    build_shard(photo_root / "val", beton, max_res=80, workers=1, progress=False)
    backbone, cpu = load_backbone(None, "resnet18"), torch.device("cpu")
    from_shard = extract_features(backbone, beton, 48, 32, cpu, workers=1)
    from_folder = extract_features(backbone, photo_root / "val", 48, 32, cpu, workers=0)
    assert from_shard.num_classes == 12 and from_shard.classes is None
    assert torch.equal(from_shard.labels, from_folder.labels)  # sequential order, same labels
    # Same centre crop of the same photos; the shard's JPEG re-encode and resizer differ slightly.
    similarity = (from_shard.feats * from_folder.feats).sum(dim=1)
    assert similarity.mean() > 0.95 and similarity.min() > 0.8
    # The compiled loader is reused for a second pass (a monitor's next call): same order, same pixels.
    assert open_images(beton, 48, 32, workers=1) is open_images(beton, 48, 32, workers=1)
    again = extract_features(backbone, beton, 48, 32, cpu, workers=1)
    assert torch.equal(again.labels, from_shard.labels) and torch.allclose(again.feats, from_shard.feats)


def test_more_workers_than_cpus_read_the_shard_with_the_cpus_there_are(
        photo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("ffcv")
    beton = tmp_path / "val.beton"
    build_shard(photo_root / "val", beton, max_res=48, workers=1, progress=False)
    usable = len(os.sched_getaffinity(0))
    images = open_images(beton, 32, 16, workers=usable + 6)
    x, y = next(iter(images))
    assert x.shape[1:] == (3, 32, 32) and len(y) == len(x) == 16
    assert f"{usable + 6} FFCV workers asked for, {usable} CPUs usable here" in capsys.readouterr().err


def test_a_broken_shard_is_a_usage_error(tmp_path: Path) -> None:
    beton = tmp_path / "broken.beton"
    beton.write_bytes(b"\0" * 100)
    with pytest.raises(UsageError, match="not a complete FFCV shard"):
        open_images(beton, 32, 8)
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(UsageError, match="not a .beton"):
        open_images(tmp_path / "x.jpg", 32, 8)
