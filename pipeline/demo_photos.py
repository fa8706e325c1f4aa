"""A small ImageFolder of real photos, built from images that installed packages ship.

No downloads: the photos come from scikit-image's `skimage.data`, scikit-learn's sample
images and matplotlib's sample data. Each photo is one class; its samples are distinct
JPEG crops of it (different regions, scales and sizes), so a kNN on features of held-out
crops measures whether a backbone recognises a scene from a part of it.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

# (class name, package, file) — colour photographs only; drawings, text and masks left out.
PHOTOS: tuple[tuple[str, str, str], ...] = (
    ("astronaut", "skimage", "astronaut.png"),
    ("chelsea", "skimage", "chelsea.png"),
    ("coffee", "skimage", "coffee.png"),
    ("hubble", "skimage", "hubble_deep_field.jpg"),
    ("ihc", "skimage", "ihc.png"),
    ("motorcycle", "skimage", "motorcycle_left.png"),
    ("retina", "skimage", "retina.jpg"),
    ("rocket", "skimage", "rocket.jpg"),
    ("china", "sklearn", "china.jpg"),
    ("flower", "sklearn", "flower.jpg"),
    ("grace_hopper", "matplotlib", "grace_hopper.jpg"),
    ("camera", "skimage", "camera.png"),
)


def _package_dir(package: str) -> Path:
    if package == "skimage":
        import skimage.data

        return Path(skimage.data.__file__).parent
    if package == "sklearn":
        import sklearn.datasets

        return Path(sklearn.datasets.__file__).parent / "images"
    if package == "matplotlib":
        import matplotlib

        return Path(matplotlib.get_data_path()) / "sample_data"
    raise ValueError(package)


def load_photo(package: str, name: str) -> Image.Image:
    return Image.open(_package_dir(package) / name).convert("RGB")


def _random_crop(img: Image.Image, rng: np.random.Generator, out_side: int) -> Image.Image:
    w, h = img.size
    area = w * h * rng.uniform(0.15, 0.6)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw = int(min(w, round(np.sqrt(area * aspect))))
    ch = int(min(h, round(np.sqrt(area / aspect))))
    x = int(rng.integers(0, w - cw + 1))
    y = int(rng.integers(0, h - ch + 1))
    crop = img.crop((x, y, x + cw, y + ch))
    scale = out_side / max(cw, ch)
    return crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BICUBIC)


def _write_class(out: Path, ci: int, cls: str, package: str, name: str, per_class_train: int, per_class_val: int,
                 side: int, seed: int) -> None:
    img = load_photo(package, name)
    for split, n, offset in (("train", per_class_train, 0), ("val", per_class_val, 1)):
        rng = np.random.default_rng([seed, ci, offset])
        d = out / split / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _random_crop(img, rng, side).save(d / f"{cls}_{i:04d}.jpg", quality=90)


def build_photo_folder(out: str | Path, per_class_train: int = 24, per_class_val: int = 8,
                       side: int = 160, seed: int = 0, classes: int | None = None) -> Path:
    """Write out/train/<class>/*.jpg and out/val/<class>/*.jpg; return out. Idempotent."""
    out = Path(out)
    photos = PHOTOS[:classes] if classes else PHOTOS
    spec = {"per_class_train": per_class_train, "per_class_val": per_class_val, "side": side, "seed": seed,
            "classes": [c for c, _, _ in photos]}
    marker = out / "photos.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return out
    jobs = [(out, ci, cls, package, name, per_class_train, per_class_val, side, seed)
            for ci, (cls, package, name) in enumerate(photos)]
    with ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        list(pool.map(_write_class, *zip(*jobs)))
    marker.write_text(json.dumps(spec))
    return out
