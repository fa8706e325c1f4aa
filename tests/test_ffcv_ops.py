"""The FFCV multi-crop numba kernels against PIL / torchvision / scipy on a real photo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from scipy.ndimage import gaussian_filter

from pipeline import ffcv_ops as ops
from pipeline.demo_photos import load_photo
from pipeline.recipe import MultiCropRecipe


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A real photo, small enough that every kernel runs in milliseconds: uint8 [72, 96, 3]."""
    return np.asarray(load_photo("skimage", "coffee.png").resize((96, 72), Image.BICUBIC)).copy()


def as_buffer(img: np.ndarray) -> np.ndarray:
    h, w, _ = img.shape
    return img.astype(np.float32).reshape(h, w * 3).copy()


def as_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1).float() / 255


def back(buf: np.ndarray, like: np.ndarray) -> np.ndarray:
    return buf.reshape(like.shape)


def test_grayscale_matches_torchvision(photo: np.ndarray) -> None:
    buf = as_buffer(photo)
    ops.to_grayscale(buf)
    ref = TF.rgb_to_grayscale(as_tensor(photo), num_output_channels=3).permute(1, 2, 0).numpy() * 255
    np.testing.assert_allclose(back(buf, photo), ref, atol=1e-3)


@pytest.mark.parametrize("name, factor", [("brightness", 1.3), ("brightness", 0.6), ("contrast", 1.4),
                                          ("contrast", 0.6), ("saturation", 1.2), ("saturation", 0.8)])
def test_jitter_matches_torchvision(photo: np.ndarray, name: str, factor: float) -> None:
    buf = as_buffer(photo)
    getattr(ops, f"adjust_{name}")(buf, factor)
    ref = getattr(TF, f"adjust_{name}")(as_tensor(photo), factor).permute(1, 2, 0).numpy() * 255
    np.testing.assert_allclose(back(buf, photo), ref, atol=2e-3)
    assert not np.allclose(back(buf, photo), photo)


@pytest.mark.parametrize("shift", [-0.1, 0.04, 0.1])
def test_hue_matches_torchvision(photo: np.ndarray, shift: float) -> None:
    buf = as_buffer(photo)
    ops.adjust_hue(buf, shift)
    ref = TF.adjust_hue(as_tensor(photo), shift).permute(1, 2, 0).numpy() * 255
    np.testing.assert_allclose(back(buf, photo), ref, atol=0.05)
    assert np.abs(back(buf, photo) - photo).mean() > 1.0


def test_solarize_matches_pil(photo: np.ndarray) -> None:
    buf = as_buffer(photo)
    ops.solarize(buf, 128)
    ref = np.asarray(ImageOps.solarize(Image.fromarray(photo), 128))
    np.testing.assert_array_equal(back(buf, photo), ref)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_blur_matches_scipy_gaussian(photo: np.ndarray, sigma: float) -> None:
    buf = as_buffer(photo)
    ops.gaussian_blur(buf, sigma)
    # scipy's radius int(3 sigma + 0.5) equals our ceil(3 sigma) for these sigmas.
    ref = gaussian_filter(photo.astype(np.float64), sigma=(sigma, sigma, 0), mode="nearest", truncate=3.0)
    np.testing.assert_allclose(back(buf, photo), ref, atol=1e-2)


@pytest.mark.parametrize("box, size, flip", [((10, 5, 40, 50), 64, False), ((0, 0, 72, 96), 32, True),
                                             ((20, 30, 30, 20), 96, True)])
def test_resized_crop_matches_pil_bicubic(photo: np.ndarray, box: tuple[int, int, int, int], size: int,
                                          flip: bool) -> None:
    top, left, h, w = box
    out = back(ops.resized_crop(photo, top, left, h, w, size, flip), np.zeros((size, size, 3)))
    ref = Image.fromarray(photo).crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
    if flip:
        ref = ImageOps.mirror(ref)
    # PIL rounds to uint8 between its two passes; we keep floats, so allow a small mean gap.
    diff = np.abs(out - np.asarray(ref, np.float32))
    assert diff.mean() < 0.6 and diff.max() < 12


def test_random_crop_follows_scale_and_ratio() -> None:
    lo, hi = 0.05, 0.4
    fracs, aspects = [], []
    state = ops.stream_key(0, 0, 0, 0)
    for _ in range(3000):
        state, top, left, h, w = ops.random_crop(state, 192, 256, lo, hi, 3 / 4, 4 / 3)
        assert 0 <= top <= 192 - h and 0 <= left <= 256 - w
        fracs.append(h * w / (192 * 256))
        aspects.append(w / h)
    fracs, aspects = np.array(fracs), np.array(aspects)
    assert fracs.min() > lo * 0.9 and fracs.max() < hi * 1.1
    assert abs(fracs.mean() - (lo + hi) / 2) < 0.01  # uniform in area, as torchvision
    assert aspects.min() > 0.7 and aspects.max() < 1.4
    assert abs(np.log(aspects).mean()) < 0.02  # log-uniform ratio around 1


def test_streams_are_keyed_by_seed_epoch_index_view() -> None:
    keys = {ops.stream_key(s, e, i, v) for s in range(3) for e in range(3) for i in range(3) for v in range(3)}
    assert len(keys) == 81
    assert ops.stream_key(1, 2, 3, 4) == ops.stream_key(1, 2, 3, 4)


def run_recipe(img: np.ndarray, recipe: MultiCropRecipe, seed: int, epoch: int, index: int) -> np.ndarray:
    views, offsets, shared = ops.recipe_tables(recipe)
    out = np.zeros(offsets[-1], np.uint8)
    ops.augment_sample(img, out, views, offsets, shared, seed, epoch, index)
    return out


def test_augment_sample_is_seeded(photo: np.ndarray) -> None:
    r = MultiCropRecipe().with_views(2, 48, 2, 24)
    a = run_recipe(photo, r, 0, 0, 5)
    np.testing.assert_array_equal(a, run_recipe(photo, r, 0, 0, 5))
    for other in ((1, 0, 5), (0, 1, 5), (0, 0, 6)):
        assert not np.array_equal(a, run_recipe(photo, r, *other))


def test_augment_sample_wires_the_recipe(photo: np.ndarray) -> None:
    """With every random choice pinned, the views are exactly the deterministic ops composed."""
    plain = MultiCropRecipe(global_scale=(1.0, 1.0), local_scale=(1.0, 1.0), ratio=(96 / 72, 96 / 72),
                            flip_p=1.0, jitter_p=0.0, grayscale_p=1.0, global_blur_p=(0.0, 0.0),
                            local_blur_p=0.0, global_solarize_p=(1.0, 1.0), local_solarize_p=1.0)
    r = plain.with_views(2, 40, 1, 16)
    out = run_recipe(photo, r, 0, 0, 0)
    _, offsets, _ = ops.recipe_tables(r)
    for v, size in enumerate((40, 40, 16)):
        buf = ops.resized_crop(photo, 0, 0, 72, 96, size, True)
        ops.to_grayscale(buf)
        ops.solarize(buf, 128)
        expect = np.clip(buf + 0.5, 0, 255).astype(np.uint8).reshape(-1)
        np.testing.assert_array_equal(out[offsets[v]:offsets[v + 1]], expect)
