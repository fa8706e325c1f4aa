"""The multi-crop augmentation recipe: one frozen definition that every backend reads.

Defaults are the official MVEB (DINO-style) augmentation: 2 global views at 224 px and
6 local views at 96 px. Backends (torchvision/PIL, FFCV, DALI) take a `MultiCropRecipe`
and never hard-code a size, probability or statistic of their own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewSpec:
    """What one view of a sample gets: crop, flip, colour and filter probabilities."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float
    is_global: bool


@dataclass(frozen=True)
class MultiCropRecipe:
    n_global: int = 2
    n_local: int = 6
    global_size: int = 224
    local_size: int = 96
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    # Per global view (view 1, view 2, ...); locals share one value.
    global_blur_p: tuple[float, ...] = (1.0, 0.1)
    local_blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    global_solarize_p: tuple[float, ...] = (0.0, 0.2)
    local_solarize_p: float = 0.0
    solarize_threshold: int = 128
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.n_global < 1 or self.n_local < 0:
            raise ValueError(f"need n_global >= 1 and n_local >= 0, got {self.n_global}, {self.n_local}")
        if self.global_size < 8 or (self.n_local and self.local_size < 8):
            raise ValueError("view sizes must be at least 8 px")
        for name in ("global_blur_p", "global_solarize_p"):
            if len(getattr(self, name)) != self.n_global:
                raise ValueError(f"{name} needs one probability per global view ({self.n_global})")
        for lo, hi in (self.global_scale, self.local_scale, self.ratio, self.blur_sigma):
            if not 0 < lo <= hi:
                raise ValueError(f"bad range ({lo}, {hi})")

    @property
    def n_views(self) -> int:
        return self.n_global + self.n_local

    def views(self) -> list[ViewSpec]:
        """The V views in batch order: globals first, then locals."""
        g = [
            ViewSpec(self.global_size, self.global_scale, self.global_blur_p[i], self.global_solarize_p[i], True)
            for i in range(self.n_global)
        ]
        loc = [
            ViewSpec(self.local_size, self.local_scale, self.local_blur_p, self.local_solarize_p, False)
            for _ in range(self.n_local)
        ]
        return g + loc

    def with_views(self, n_global: int, global_size: int, n_local: int, local_size: int) -> "MultiCropRecipe":
        """A cheaper or larger variant that keeps the per-view probabilities' pattern."""
        gb = tuple(self.global_blur_p[min(i, len(self.global_blur_p) - 1)] for i in range(n_global))
        gs = tuple(self.global_solarize_p[min(i, len(self.global_solarize_p) - 1)] for i in range(n_global))
        return replace(self, n_global=n_global, global_size=global_size, n_local=n_local,
                       local_size=local_size, global_blur_p=gb, global_solarize_p=gs)

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_RECIPE = MultiCropRecipe()
