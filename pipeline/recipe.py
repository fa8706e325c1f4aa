"""The multi-crop augmentation recipe: one frozen definition that every backend reads.

Defaults are the official MVEB (DINO-style) augmentation: 2 global views at 224 px and
6 local views at 96 px. Backends (torchvision/PIL, FFCV, DALI) take a `MultiCropRecipe`
and never hard-code a size, probability or statistic of their own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, get_args, get_origin, get_type_hints

from mveb.errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Longest side an FFCV shard stores. The torchvision and DALI backends crop the original
# JPEG; a shard at 256 px made FFCV's global crops visibly blurrier (mean gradient -17.5% on
# 500-px photos) because a 0.4-scale crop of 256 px is upsampled to 224. 512 keeps ImageNet
# (mostly <= 500 px) at its own size, so all three backends see the same pixels.
SHARD_MAX_RES = 512


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
        for name in ("global_scale", "local_scale", "ratio", "blur_sigma"):
            lo, hi = getattr(self, name)
            top = 1.0 if name.endswith("scale") else float("inf")  # a crop's share of the image area
            if not 0 < lo <= hi <= top:
                raise ValueError(f"{name}=({lo}, {hi}) is not a range 0 < lo <= hi" + (" <= 1" if top == 1 else ""))
        probabilities = {"flip_p": self.flip_p, "jitter_p": self.jitter_p, "grayscale_p": self.grayscale_p,
                         "local_blur_p": self.local_blur_p, "local_solarize_p": self.local_solarize_p,
                         **{f"global_blur_p[{i}]": p for i, p in enumerate(self.global_blur_p)},
                         **{f"global_solarize_p[{i}]": p for i, p in enumerate(self.global_solarize_p)}}
        for name, p in probabilities.items():
            if not 0 <= p <= 1:
                raise ValueError(f"{name}={p} is not a probability")
        if min(self.brightness, self.contrast, self.saturation) < 0 or not 0 <= self.hue <= 0.5:
            raise ValueError("colour jitter needs brightness, contrast, saturation >= 0 and 0 <= hue <= 0.5")
        if not 0 <= self.solarize_threshold <= 256:
            raise ValueError(f"solarize_threshold={self.solarize_threshold} is not a uint8 level (0-256)")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need three values (R, G, B), std > 0")

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

    def with_overrides(self, text: str) -> "MultiCropRecipe":
        """The recipe that "key=value,..." over the fields above gives, a range or a per-view
        tuple as values joined by ':' (e.g. "global_scale=0.14:1,global_blur_p=1:0.1,flip_p=0");
        "" is this recipe. View counts and sizes are not keys here: they have their own."""
        chosen: dict[str, Any] = {}
        types = get_type_hints(MultiCropRecipe)
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = (x.strip() for x in item.partition("="))
            if not sep or key not in types or key in VIEW_FIELDS:
                keys = ", ".join(k for k in types if k not in VIEW_FIELDS)
                raise UsageError(f"augmentation {item!r}: use key=value with a key among {keys}")
            kind = types[key]
            if get_origin(kind) is tuple:
                n = len(get_args(kind)) if Ellipsis not in get_args(kind) else None
                expected = f"{n} numbers joined by ':'" if n else "numbers joined by ':'"
                try:
                    chosen[key] = tuple(float(v) for v in value.split(":"))
                except ValueError:
                    raise UsageError(f"augmentation {key}={value!r}: expected {expected}") from None
                if n and len(chosen[key]) != n:
                    raise UsageError(f"augmentation {key}={value!r}: expected {expected}")
                continue
            try:
                chosen[key] = kind(value)
            except ValueError:
                raise UsageError(f"augmentation {key}={value!r}: expected {kind.__name__}") from None
        try:
            return replace(self, **chosen)
        except ValueError as e:
            raise UsageError(f"augmentation {text!r}: {e}") from None

    def to_dict(self) -> dict:
        return asdict(self)


VIEW_FIELDS = ("n_global", "global_size", "n_local", "local_size")
DEFAULT_RECIPE = MultiCropRecipe()
