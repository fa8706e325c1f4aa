"""The torchvision/PIL reference multi-crop loader: the definition of a correct batch.

It applies `MultiCropRecipe` the way the official MVEB (DINO-style) code does, with PIL:
RandomResizedCrop (bicubic), horizontal flip, ColorJitter in random order with
probability jitter_p, grayscale, PIL GaussianBlur(radius=sigma) and solarize with each
view's probability. It is slow by design (one CPU core decodes and augments a whole
sample) and is the baseline of every loader benchmark.

Determinism: the epoch order is a permutation drawn from (seed, epoch), sharded by rank;
every sample's augmentation draws from its own generator seeded with (seed, epoch, index).
So the batches depend on neither the worker count nor where the epoch was interrupted:
a loader restored with `load_state_dict` yields exactly the remaining batches.

Epoch bookkeeping: iterating yields the current epoch from `batches_done` on; running it
to the end advances to the next epoch. `set_epoch(e)` with a new epoch restarts at batch 0,
with the current epoch it keeps the position (so resume, then set_epoch, continues).
"""

from __future__ import annotations

import math
import sys
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset

from mveb.errors import UsageError

from .batch import MultiCropBatch, check_loader_args, nothing_decodable
from .images import Sample, list_image_folder, open_rgb, usable_cpus
from .recipe import MultiCropRecipe, ViewSpec


def crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
             rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a RandomResizedCrop: torchvision's algorithm, our generator."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    # Ten misses (extreme aspect ratios): the central crop with the nearest allowed ratio.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class MultiCropAugment:
    """The recipe on one PIL RGB image: a list of HWC uint8 arrays, globals first."""

    def __init__(self, recipe: MultiCropRecipe) -> None:
        self.recipe = recipe
        self.views = recipe.views()

    def view(self, img: Image.Image, spec: ViewSpec, rng: np.random.Generator) -> np.ndarray:
        r = self.recipe
        # Every draw happens whether or not it is used, so each view consumes a fixed
        # number of draws and changing one probability does not reshuffle the others.
        left, top, w, h = crop_box(img.width, img.height, spec.scale, r.ratio, rng)
        flip = rng.random() < r.flip_p
        jitter = rng.random() < r.jitter_p
        order = rng.permutation(4)
        b = rng.uniform(max(0.0, 1 - r.brightness), 1 + r.brightness)
        c = rng.uniform(max(0.0, 1 - r.contrast), 1 + r.contrast)
        s = rng.uniform(max(0.0, 1 - r.saturation), 1 + r.saturation)
        hue = rng.uniform(-r.hue, r.hue)
        gray = rng.random() < r.grayscale_p
        blur = rng.random() < spec.blur_p
        sigma = rng.uniform(*r.blur_sigma)
        solarize = rng.random() < spec.solarize_p

        out = img.crop((left, top, left + w, top + h)).resize((spec.size, spec.size), Image.BICUBIC)
        if flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if jitter:
            ops = (partial(TF.adjust_brightness, brightness_factor=b), partial(TF.adjust_contrast, contrast_factor=c),
                   partial(TF.adjust_saturation, saturation_factor=s), partial(TF.adjust_hue, hue_factor=hue))
            for i in order:
                out = ops[i](out)
        if gray:
            out = out.convert("L").convert("RGB")
        if blur:
            out = out.filter(ImageFilter.GaussianBlur(radius=sigma))
        if solarize:
            out = ImageOps.solarize(out, threshold=r.solarize_threshold)
        return np.asarray(out, dtype=np.uint8)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> list[np.ndarray]:
        return [self.view(img, spec, rng) for spec in self.views]


class _NothingDecodable(Exception):
    """Raised in a worker; DataLoader re-raises it in the trainer by type, its text a traceback."""


class _MultiCropDataset(Dataset):
    """Indexed by (epoch, sample index), so a sample's augmentation never depends on who asks."""

    def __init__(self, samples: Sequence[Sample], recipe: MultiCropRecipe, seed: int) -> None:
        self.samples = samples
        self.augment = MultiCropAugment(recipe)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def _open(self, index: int) -> tuple[Image.Image, int]:
        # A broken file is reported and replaced by the next decodable one, so one bad
        # JPEG costs a warning, not the run (`mveb validate` finds them all up front).
        for k in range(len(self.samples)):
            path, label = self.samples[(index + k) % len(self.samples)]
            try:
                return open_rgb(path), label
            except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file"
                sys.stderr.write(f"warning: cannot decode {path} ({e}); using the next file instead. "
                                 "Run `mveb validate` and train from its --fix-list.\n")
        raise _NothingDecodable()

    def __getitem__(self, key: tuple[int, int]) -> tuple[list[np.ndarray], int]:
        epoch, index = key
        img, label = self._open(index)
        return self.augment(img, np.random.default_rng([self.seed, epoch, index])), label


def _stack(arrays: list[np.ndarray]) -> torch.Tensor:
    """[N, H, W, 3] uint8 viewed as NCHW: channels_last strides for free."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def _collate(items: list[tuple[list[np.ndarray], int]], n_global: int, n_local: int,
             local_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # View-major order: view 1 of every sample, then view 2, ... (the batch contract).
    g = _stack([views[v] for v in range(n_global) for views, _ in items])
    if n_local:
        loc = _stack([views[n_global + v] for v in range(n_local) for views, _ in items])
    else:
        loc = torch.empty(0, 3, local_size, local_size, dtype=torch.uint8)
    return g, loc, torch.tensor([label for _, label in items], dtype=torch.int64)


def epoch_order(n: int, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's sample indices for one epoch: a seeded permutation, padded by wrapping
    so every rank gets the same count (unequal counts would hang DDP at the epoch's end)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    per_rank = -(-n // world_size)
    perm = np.resize(perm, per_rank * world_size)
    return perm[rank::world_size]


def resolve_samples(data: str | Path | Sequence[Sample]) -> tuple[list[str] | None, list[Sample]]:
    """(classes or None, samples) from an ImageFolder root or a (path, label) list."""
    if isinstance(data, (str, Path)):
        if str(data).endswith(".beton"):
            raise UsageError(f"{data} is an FFCV shard; this backend reads an ImageFolder (use the ffcv backend)")
        return list_image_folder(data)
    samples = [(str(p), int(y)) for p, y in data]
    if not samples:
        raise UsageError("the list of images is empty")
    return None, samples


class TorchMultiCropLoader:
    """The reference `MultiCropLoader`: PIL augmentations in DataLoader worker processes.

    `data` is an ImageFolder root or a list of (path, label) (e.g. `mveb validate`'s good
    files). Workers emit uint8 views; normalization and the dtype cast run on `device`,
    so on a GPU the host only ships bytes.
    """

    def __init__(self, data: str | Path | Sequence[Sample], recipe: MultiCropRecipe, batch_size: int, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                 rank: int = 0, world_size: int = 1, workers: int | None = None, drop_last: bool = True) -> None:
        check_loader_args(batch_size, rank, world_size)
        self.classes, self.samples = resolve_samples(data)
        self.recipe, self.batch_size = recipe, batch_size
        self.device, self.dtype = torch.device(device), dtype
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.workers = usable_cpus() if workers is None else workers
        self.drop_last = drop_last
        self.epoch, self.batches_done = 0, 0
        if len(self) == 0:
            raise UsageError(f"{len(self.samples)} images make no full batch of {batch_size} on each of "
                             f"{world_size} ranks; lower the batch size")
        self._dataset = _MultiCropDataset(self.samples, recipe, seed)
        # (x - 255 mean) / (255 std) as one in-place multiply-add: x * scale + shift.
        self._scale = 1 / (torch.tensor(recipe.std, device=self.device).view(1, 3, 1, 1) * 255)
        self._shift = -torch.tensor(recipe.mean, device=self.device).view(1, 3, 1, 1) * 255 * self._scale

    def __len__(self) -> int:
        per_rank = -(-len(self.samples) // self.world_size)
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches_done = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "seed": self.seed,
                "world_size": self.world_size, "batch_size": self.batch_size, "n_samples": len(self.samples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        same = all(state.get(k, v) == v for k, v in (("seed", self.seed), ("world_size", self.world_size),
                                                       ("batch_size", self.batch_size),
                                                       ("n_samples", len(self.samples))))
        # A position only means something for the same order; otherwise restart the epoch.
        self.batches_done = int(state["batches_done"]) if same else 0
        if not same:
            sys.stderr.write("warning: loader state is from a different seed, world size, batch size or "
                             "dataset; restarting the epoch from its first batch\n")

    def _batch_keys(self) -> list[list[tuple[int, int]]]:
        order = epoch_order(len(self.samples), self.seed, self.epoch, self.rank, self.world_size)
        keys = [(self.epoch, int(i)) for i in order]
        return [keys[i:i + self.batch_size] for i in range(0, len(self) * self.batch_size, self.batch_size)]

    def _finish(self, views: torch.Tensor) -> torch.Tensor:
        x = views.to(self.device, non_blocking=True).float()
        x.mul_(self._scale).add_(self._shift)
        return x.to(self.dtype).contiguous(memory_format=torch.channels_last)

    def __iter__(self) -> Iterator[MultiCropBatch]:
        keys = self._batch_keys()[self.batches_done:]
        r = self.recipe
        collate = partial(_collate, n_global=r.n_global, n_local=r.n_local, local_size=r.local_size)
        workers = min(self.workers, len(keys))
        loader = DataLoader(self._dataset, batch_sampler=keys, num_workers=workers, collate_fn=collate,
                            pin_memory=self.device.type == "cuda")
        try:
            for g, loc, labels in loader:
                self.batches_done += 1
                yield MultiCropBatch(self._finish(g), self._finish(loc), labels.to(self.device, non_blocking=True))
        except _NothingDecodable:
            raise nothing_decodable(len(self.samples), self.samples[0][0]) from None
        self.epoch, self.batches_done = self.epoch + 1, 0
