"""The three backends implement one recipe: their augmentation statistics agree on real JPEGs.

Per global view (view 1 always blurred, view 2 sometimes solarized) and for the locals
pooled, over two full epochs of the photo set (every image exactly twice, so image content
is the same for all backends and only augmentation randomness differs), we compare each
channel's pixel mean and std and the mean absolute horizontal gradient (blur and crop
scale move it) against the torchvision reference.

Tolerances. Six seeds of the reference gave a seed-to-seed spread (sigma) of at most 0.03
for a channel mean, 0.025 for a channel std and 3% for the gradient; two independent
backends differ by sqrt(2) sigma, so 4 of those is 0.17 / 0.14 / 17% with nothing wrong.
Legitimate implementation differences (bicubic vs the backends' resamplers, the shard's
re-encoded JPEG, hue in another colour space) measured below 0.05 / 0.05 / 5%. The bounds
0.2 / 0.15 / 20% still catch the bugs that matter: no normalization (means off by > 1),
RGB/BGR swapped (red and blue means differ by ~0.25 here), solarize never applied to view 2
(its mean moves ~0.26), blur missing from view 1 (its gradient rises ~60%), global and
local crop scales swapped (view 2's gradient drops 22%).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.batch import MultiCropBatch
from pipeline.loaders import build_loader
from pipeline.recipe import MultiCropRecipe
from pipeline.shards import build_shard
from train.config import get_config

RECIPE = MultiCropRecipe().with_views(2, 64, 2, 32)
BATCH = 32
EPOCHS = 2
MEAN_TOL, STD_TOL, GRAD_REL_TOL = 0.2, 0.15, 0.2


def _epochs(backend: str, data: Path) -> list[MultiCropBatch]:
    loader = build_loader(backend, data, RECIPE, BATCH, seed=0, workers=2)
    out = []
    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        # FFCV reuses its batch buffers: keep copies.
        out += [MultiCropBatch(b.global_views.clone(), b.local_views.clone(), b.labels.clone()) for b in loader]
    assert len(out) == EPOCHS * len(loader)
    return out


def _stats(batches: list[MultiCropBatch]) -> dict[str, torch.Tensor]:
    """name -> [mean R, G, B, std R, G, B, gradient] of one view group."""
    views = list(zip(*(b.views(RECIPE.n_global, RECIPE.n_local) for b in batches)))
    groups = {f"global{v + 1}": [torch.cat(views[v])] for v in range(RECIPE.n_global)}
    groups["locals"] = [torch.cat(views[v]) for v in range(RECIPE.n_global, RECIPE.n_views)]
    out = {}
    for name, xs in groups.items():
        x = torch.cat(xs).float()
        grad = (x[..., 1:] - x[..., :-1]).abs().mean().view(1)
        out[name] = torch.cat([x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)), grad])
    return out


@pytest.fixture(scope="module")
def shard(photo_train: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("ffcv")
    out = tmp_path_factory.mktemp("agree") / "train.beton"
    build_shard(photo_train, out, workers=2, progress=False)
    return out


@pytest.mark.slow
def test_ffcv_and_dali_statistics_match_the_reference(photo_train: Path, shard: Path) -> None:
    pytest.importorskip("nvidia.dali")
    ref = _stats(_epochs("torch", photo_train))
    # The statistics must be able to fail: view 2's solarize and view 1's blur show in the reference.
    assert ref["global2"][:3].mean() < ref["global1"][:3].mean() - 0.1
    assert ref["global1"][6] < 0.8 * ref["global2"][6]
    for backend, data in (("ffcv", shard), ("dali", photo_train)):
        got = _stats(_epochs(backend, data))
        for group, r in ref.items():
            g = got[group]
            where = f"{backend} {group}: got {g.tolist()}, reference {r.tolist()}"
            assert (g[:3] - r[:3]).abs().max() < MEAN_TOL, where
            assert (g[3:6] - r[3:6]).abs().max() < STD_TOL, where
            assert abs(g[6] / r[6] - 1) < GRAD_REL_TOL, where


def _channel_spread(views: torch.Tensor) -> float:
    """Largest difference between a pixel's R, G and B once un-normalized (0 for gray views)."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (RECIPE.mean, RECIPE.std))
    rgb = views.float() * std + mean
    return (rgb.amax(1) - rgb.amin(1)).max().item()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "ffcv", "dali"])
def test_an_augment_override_reaches_every_backend(backend: str, photo_train: Path, shard: Path) -> None:
    """`data.augment` is the recipe every loader reads: grayscale always and jitter never give
    gray views in each backend, where the paper's recipe gives colour ones; a fixed blur sigma
    blurs."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    data = shard if backend == "ffcv" else photo_train
    gray = get_config("demo", ["data.augment=grayscale_p=1,jitter_p=0"]).data.recipe()
    for recipe, is_gray in ((gray, True), (get_config("demo").data.recipe(), False)):
        assert recipe.global_size == RECIPE.global_size and recipe.mean == RECIPE.mean
        b = next(iter(build_loader(backend, data, recipe, BATCH, seed=0, workers=2)))
        for views in (b.global_views, b.local_views):
            spread = _channel_spread(views)
            assert spread < 3 / 255 if is_gray else spread > 0.3, (backend, is_gray, spread)
    # A fixed value as a range (lo == hi; DALI's uniform refuses an empty range) blurs every view.
    sharpness = []
    for augment in ("global_blur_p=0:0", "global_blur_p=1:1,blur_sigma=2:2"):
        recipe = get_config("demo", [f"data.augment={augment}"]).data.recipe()
        g = next(iter(build_loader(backend, data, recipe, BATCH, seed=0, workers=2))).global_views
        sharpness.append((g[..., 1:] - g[..., :-1]).abs().mean().item())
    assert sharpness[1] < 0.7 * sharpness[0], (backend, sharpness)
