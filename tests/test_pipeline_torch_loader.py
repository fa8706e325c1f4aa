"""The reference loader on real JPEGs: contract, recipe semantics, determinism, resume, sharding."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pipeline.recipe import MultiCropRecipe
from pipeline.torch_loader import MultiCropAugment, TorchMultiCropLoader

SMALL = MultiCropRecipe().with_views(2, 64, 2, 32)
B = 8


def _loader(data, **kw) -> TorchMultiCropLoader:
    kw.setdefault("workers", 0)
    kw.setdefault("seed", 3)
    return TorchMultiCropLoader(data, kw.pop("recipe", SMALL), kw.pop("batch_size", B), **kw)


@pytest.fixture(scope="session")
def first_epoch(photo_train: Path) -> list:
    return list(_loader(photo_train, workers=2))


def test_batches_follow_the_contract(first_epoch: list, photo_train: Path) -> None:
    n_images = sum(1 for _ in photo_train.rglob("*.jpg"))
    assert len(first_epoch) == n_images // B
    lo = min((0 - m) / s for m, s in zip(SMALL.mean, SMALL.std))
    hi = max((1 - m) / s for m, s in zip(SMALL.mean, SMALL.std))
    for b in first_epoch:
        b.check(SMALL, B)
        assert b.global_views.dtype == torch.float32 and b.labels.dtype == torch.int64
        assert lo - 1e-5 <= b.global_views.min() and b.global_views.max() <= hi + 1e-5
        assert lo - 1e-5 <= b.local_views.min() and b.local_views.max() <= hi + 1e-5
    labels = torch.cat([b.labels for b in first_epoch])
    assert len(set(labels.tolist())) == len([d for d in photo_train.iterdir() if d.is_dir()])
    # Normalized real photos: roughly zero-centred, unit-scale, not constant.
    g = torch.cat([b.global_views for b in first_epoch])
    assert -1.0 < g.mean().item() < 1.0 and 0.5 < g.std().item() < 1.6


def test_same_batches_whatever_the_worker_count(first_epoch: list, photo_train: Path) -> None:
    b = next(iter(_loader(photo_train, workers=0)))
    assert torch.equal(b.global_views, first_epoch[0].global_views)
    assert torch.equal(b.local_views, first_epoch[0].local_views)
    assert torch.equal(b.labels, first_epoch[0].labels)


def test_resumed_loader_continues_mid_epoch(first_epoch: list, photo_train: Path) -> None:
    a = _loader(photo_train, workers=1)
    it = iter(a)
    for _ in range(4):
        next(it)
    state = a.state_dict()
    assert state["epoch"] == 0 and state["batches_done"] == 4
    b = _loader(photo_train, workers=2)
    b.load_state_dict(state)
    b.set_epoch(0)  # what a trainer does after restoring: same epoch keeps the position
    rest = list(b)
    assert len(rest) == len(first_epoch) - 4
    for x, y in zip(rest, first_epoch[4:]):
        assert torch.equal(x.global_views, y.global_views) and torch.equal(x.labels, y.labels)
    assert b.state_dict()["epoch"] == 1 and b.state_dict()["batches_done"] == 0


def test_epochs_differ_and_ranks_split_the_data(photo_train: Path) -> None:
    recipe = SMALL.with_views(1, 16, 0, 16)
    one = _loader(photo_train, recipe=recipe, batch_size=4)
    e0 = next(iter(one))
    one.set_epoch(1)
    e1 = next(iter(one))
    assert not torch.equal(e0.global_views, e1.global_views)
    # With augmentation off, a view identifies its sample: ranks must not overlap.
    plain = dataclasses.replace(recipe, global_scale=(1.0, 1.0), flip_p=0, jitter_p=0, grayscale_p=0,
                                global_blur_p=(0.0,), global_solarize_p=(0.0,))
    seen = []
    for rank in range(2):
        loader = _loader(photo_train, recipe=plain, batch_size=16, rank=rank, world_size=2)
        seen.append(torch.cat([b.global_views for b in loader]).flatten(1))
    assert len(seen[0]) == len(seen[1])
    assert torch.cdist(seen[0], seen[1]).min() > 1e-3


def test_augment_applies_each_recipe_step(photo_train: Path) -> None:
    img = Image.open(next(photo_train.rglob("*.jpg"))).convert("RGB").resize((120, 120))
    off = MultiCropRecipe(n_global=1, n_local=0, global_size=48, global_scale=(1.0, 1.0), ratio=(1.0, 1.0),
                          flip_p=0, jitter_p=0, grayscale_p=0, global_blur_p=(0.0,), global_solarize_p=(0.0,))
    plain = MultiCropAugment(off)(img, np.random.default_rng(0))[0]
    assert np.array_equal(plain, np.asarray(img.resize((48, 48), Image.BICUBIC)))

    def with_(**kw) -> np.ndarray:
        return MultiCropAugment(dataclasses.replace(off, **kw))(img, np.random.default_rng(0))[0]

    assert np.array_equal(with_(flip_p=1.0), plain[:, ::-1])
    assert np.array_equal(with_(global_solarize_p=(1.0,)), np.asarray(ImageOps.solarize(Image.fromarray(plain), 128)))
    gray = with_(grayscale_p=1.0)
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    blurred = with_(global_blur_p=(1.0,))
    assert np.abs(np.diff(blurred.astype(float), axis=1)).mean() < np.abs(np.diff(plain.astype(float), axis=1)).mean()
    jittered = with_(jitter_p=1.0)
    assert not np.array_equal(jittered, plain)


def test_bfloat16_output(photo_train: Path) -> None:
    b = next(iter(_loader(photo_train, dtype=torch.bfloat16)))
    b.check(SMALL, B)
    assert b.global_views.dtype == torch.bfloat16 and b.local_views.dtype == torch.bfloat16


def test_a_broken_file_is_replaced_with_a_warning(tmp_path: Path, photo_train: Path,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    cls = tmp_path / "a"
    cls.mkdir()
    for p in sorted(photo_train.rglob("*.jpg"))[:7]:
        shutil.copy(p, cls / p.name)
    (cls / "zz_truncated.jpg").write_bytes((cls / p.name).read_bytes()[:300])
    batches = list(_loader(tmp_path, batch_size=8))
    assert len(batches) == 1
    batches[0].check(SMALL, 8)
    assert "zz_truncated.jpg" in capfd.readouterr().err


def test_sample_list_input(photo_train: Path) -> None:
    files = sorted(photo_train.rglob("*.jpg"))[:8]
    loader = _loader([(str(p), 5) for p in files])
    (b,) = list(loader)
    assert b.labels.tolist() == [5] * 8 and loader.classes is None


@pytest.mark.gpu
def test_cuda_batches_are_on_the_device(photo_train: Path) -> None:
    b = next(iter(_loader(photo_train, device="cuda", dtype=torch.bfloat16, workers=2)))
    b.check(SMALL, B)
    assert b.global_views.is_cuda and b.local_views.is_cuda and b.labels.is_cuda
    ref = next(iter(_loader(photo_train, workers=0)))
    assert torch.allclose(b.global_views.float().cpu(), ref.global_views, atol=0.05)
