"""`build_loader`: one constructor for every backend, so the trainer never knows which ran."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Sequence

import torch

from mveb.errors import UsageError

from .batch import MultiCropLoader
from .images import Sample, check_image_folder
from .recipe import MultiCropRecipe

# backend -> (module, class, what to install when the import fails)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "torch": ("pipeline.torch_loader", "TorchMultiCropLoader", "torchvision and pillow"),
    "ffcv": ("pipeline.ffcv_loader", "FFCVMultiCropLoader", "pip install -e '.[ffcv]' (after the apt packages "
             "pkg-config libopencv-dev libturbojpeg0-dev)"),
    "dali": ("pipeline.dali_loader", "DALIMultiCropLoader", "pip install -e '.[dali]'"),
}


def loader_class(backend: str) -> type:
    """The loader class of `backend`, imported only now (FFCV and DALI are optional)."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown loader backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    module, name, install = BACKENDS[backend]
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise UsageError(f"the {backend} loader is not available here ({e}); install it with {install}") from None


def dali_tuning_for(backend: str, text: str) -> Any:
    """The DALITuning that "key=value,..." gives for the dali backend (None for another backend,
    where any text is a mistake)."""
    if backend != "dali":
        if text:
            raise UsageError(f"DALI tuning {text!r} given for the {backend} loader; it applies to dali only")
        return None
    loader_class(backend)  # DALI installed, or a one-line error saying how to install it
    from .dali_graph import DALITuning

    return DALITuning.from_text(text)


def check_data(backend: str, data: str | Path | Sequence[Sample]) -> None:
    """Clear errors for what every backend would otherwise fail on later and less clearly."""
    if not isinstance(data, (str, Path)):
        if not data:
            raise UsageError("the list of images is empty")
        return
    path = Path(data)
    if path.suffix == ".beton":
        if backend != "ffcv":
            raise UsageError(f"{path} is an FFCV shard; the {backend} backend reads an ImageFolder "
                             "(pass the image folder, or use the ffcv backend)")
        from .shards import check_beton

        check_beton(path)
        return
    check_image_folder(path)


def build_loader(backend: str, data: str | Path | Sequence[Sample], recipe: MultiCropRecipe, batch_size: int, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                 rank: int = 0, world_size: int = 1, workers: int | None = None,
                 dali_tuning: str = "") -> MultiCropLoader:
    """A `MultiCropLoader` of `backend` ("torch", "ffcv" or "dali") over an ImageFolder root,
    a (path, label) list, or (ffcv only) a .beton shard. dali_tuning: "key=value,..." over
    pipeline.dali_graph.DALITuning (how DALI runs, never what it computes)."""
    cls = loader_class(backend)
    tuning = dali_tuning_for(backend, dali_tuning)
    check_data(backend, data)
    return cls(data, recipe, batch_size, device=device, dtype=dtype, seed=seed, rank=rank,
               world_size=world_size, workers=workers, **({"tuning": tuning} if tuning else {}))
