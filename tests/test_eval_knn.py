"""Weighted kNN: exact vote arithmetic, a perfect extractor scores 100%, and `mveb knn` on real photos."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from mveb.cli import main
from train.features import extract_features
from train.knn import knn_eval, knn_votes


def test_votes_are_exp_of_similarity_over_t_summed_per_class() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[0.8, 0.6]])  # similarities 0.8, 0.6, 0.96
    votes = knn_votes(bank, labels, query, k=2, T=0.5, num_classes=3)
    # The two nearest are bank[2] (class 1, 0.96) and bank[0] (class 0, 0.8); bank[1] is out.
    expected = torch.tensor([[math.exp(0.8 / 0.5), math.exp(0.96 / 0.5), 0.0]])
    torch.testing.assert_close(votes, expected)
    # k beyond the bank is clipped to it: every neighbour votes.
    votes = knn_votes(bank, labels, query, k=200, T=0.5, num_classes=3)
    torch.testing.assert_close(votes, torch.tensor([[math.exp(1.6), math.exp(1.2) + math.exp(1.92), 0.0]]))


def test_knn_eval_top1_top5_and_clipped_k() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])
    queries = torch.tensor([[0.8, 0.6], [1.0, 0.0]])
    # Query 0 is class 0 but class 1 outvotes it (top-1 miss, top-2 hit); query 1 is class 0: hit.
    r = knn_eval(bank, labels, queries, torch.tensor([0, 0]), k=2, T=0.5, num_classes=3, chunk=1)
    assert (r["top1"], r["top5"], r["k"], r["n_train"], r["n_val"]) == (50.0, 100.0, 2, 3, 2)
    assert knn_eval(bank, labels, queries, torch.tensor([0, 0]))["k"] == 3


def test_class_one_hot_features_score_100() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat(30)
    feats = torch.nn.functional.one_hot(labels, 10).float() + 0.05 * torch.randn(300, 10, generator=g)
    feats = torch.nn.functional.normalize(feats, dim=1)
    r = knn_eval(feats[:200], labels[:200], feats[200:], labels[200:], num_classes=10)
    assert r["top1"] == 100.0 and r["top5"] == 100.0 and r["k"] == 200


class MeanColour(nn.Module):
    """A perfect extractor for solid-colour classes: the mean of each normalized channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("colours")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 6), ("val", 3)):
        for cls, rgb in (("blue", (20, 30, 220)), ("green", (30, 200, 40)), ("red", (210, 30, 20))):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                noise = torch.randint(-15, 16, (24, 20, 3), generator=g)
                pixels = (torch.tensor(rgb) + noise).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root


def test_perfect_extractor_through_the_image_pipeline_scores_100(colour_folder: Path) -> None:
    cpu = torch.device("cpu")
    train = extract_features(MeanColour(), colour_folder / "train", 16, 4, cpu, workers=0)
    val = extract_features(MeanColour(), colour_folder / "val", 16, 4, cpu, workers=0)
    assert train.classes == ["blue", "green", "red"] and train.feats.shape == (18, 3)
    torch.testing.assert_close(train.feats.norm(dim=1), torch.ones(18))
    assert val.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # file order, labels from folder names
    r = knn_eval(train.feats, train.labels, val.feats, val.labels, num_classes=train.num_classes)
    assert r["top1"] == 100.0


def test_undecodable_file_is_skipped_and_reported(colour_folder: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "val"
    shutil.copytree(colour_folder / "val", root)
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    val = extract_features(MeanColour(), root, 16, 4, torch.device("cpu"), workers=0)
    assert len(val.labels) == 9 and [Path(p).name for p in val.skipped] == ["broken.jpg"]


def test_mveb_knn_random_resnet18_on_real_photos(photo_root: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "knn.json"
    rc = main(["knn", "--train", str(photo_root / "train"), "--val", str(photo_root / "val"), "--arch", "resnet18",
               "--image-size", "64", "--batch-size", "64", "--workers", "0", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    r = json.loads(out.read_text())
    assert (r["n_train"], r["n_val"], r["num_classes"], r["k"], r["arch"]) == (288, 96, 12, 200, "resnet18")
    assert f"top-1 {r['top1']:6.2f}" in line and "random init" in line
    # Even random conv features tell these photos apart well above chance (8.3%).
    assert 25.0 < r["top1"] <= r["top5"] <= 100.0


@pytest.mark.parametrize("command", ["knn", "lineval"])
def test_an_unwritable_json_is_refused_before_any_feature(command: str, unwritable: Callable[[str], Path],
                                                          colour_folder: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Both once extracted every feature (and lineval trained its head) before failing to write."""
    import train.knn as knn_module

    monkeypatch.setattr(knn_module, "load_backbone", lambda *a: pytest.fail("loaded the backbone first"))
    path = unwritable("result.json")
    assert main([command, "--train", str(colour_folder / "train"), "--val", str(colour_folder / "val"),
                 "--device", "cpu", "--json", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mveb {command}: error: --json {path}: ") and "\n" not in err, err


def test_extraction_hands_the_backbone_back_in_its_mode(colour_folder: Path) -> None:
    model = MeanColour().train()
    extract_features(model, colour_folder / "val", 16, 4, torch.device("cpu"), workers=0)
    assert model.training


@pytest.mark.gpu
def test_cuda_bf16_features_agree_with_cpu_fp32(photo_root: Path) -> None:
    from train.features import load_backbone

    backbone = load_backbone(None, "resnet50")
    feats = {d: extract_features(backbone, photo_root / "val", 128, 32, torch.device(d), workers=2)
             for d in ("cpu", "cuda")}
    assert backbone.conv1.weight.device.type == "cuda" and backbone.conv1.weight.is_contiguous(
        memory_format=torch.channels_last)
    assert torch.equal(feats["cpu"].labels, feats["cuda"].labels)
    similarity = (feats["cpu"].feats * feats["cuda"].feats).sum(dim=1)
    assert similarity.min() > 0.98  # bf16 autocast on CUDA, fp32 on CPU
    train = extract_features(backbone, photo_root / "train", 128, 64, torch.device("cuda"), workers=2)
    on_gpu = knn_eval(train.feats.cuda(), train.labels, feats["cuda"].feats, feats["cuda"].labels)
    on_cpu = knn_eval(train.feats, train.labels, feats["cuda"].feats, feats["cuda"].labels)
    assert on_gpu["top1"] == on_cpu["top1"]
