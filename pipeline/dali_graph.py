"""The DALI multi-crop graph: read, decode once, then crop and augment every view.

One `MultiCropRecipe` defines the whole graph; no size, probability or statistic lives
here. On a GPU the JPEG is decoded by nvJPEG (`device="mixed"`) and every op after it runs
on the GPU; without one the same graph runs on DALI's CPU backend.

Per view the GPU does three passes over the view's pixels plus the rare optional ones, so
the pipeline stays small beside the training step it shares the GPU with:
1. `random_resized_crop` (bicubic, antialiased) from the one decoded image;
2. one `color_twist` that applies colour jitter AND grayscale: its per-sample brightness,
   contrast, saturation and hue are 1, 1, 1, 0 when the sample draws no jitter, and the
   saturation is multiplied by 0 when it draws grayscale (desaturating through the
   Y = .299 R + .587 G + .114 B axis, the weights of torchvision's grayscale);
3. blur: by default every sample of a view with 0 < p < 1 goes through one
   `gaussian_blur` whose per-sample sigma is the drawn one, or a tiny sigma whose
   3-tap window is exactly [0, 1, 0] (an identity) for samples that drew no blur; with
   `DALITuning(blur="conditional")` only the drawn samples are blurred (a DALI
   conditional splits and merges the batch). Solarize is a conditional lookup table;
4. `crop_mirror_normalize`: flip, (x - 255 mean) / (255 std), cast to fp16/fp32, HWC.

Per-sample parameters are small CPU ops, and DALI pays per sample per op (about 1 us
per sample and op measured on this project's CPU machine, the same for a scalar as for a
vector), so the graph draws each parameter with as few ops as it can.

Mapping of torchvision's ColorJitter(brightness=b, contrast=c, saturation=s, hue=h):
factors are drawn exactly as torchvision draws them (uniform in [max(0, 1-x), 1+x], hue
uniform in [-h, h] of the colour circle, i.e. times 360 degrees), but DALI applies them
as one linear colour transform in a fixed order, clamping once, where torchvision applies
the four ops in a random order and clamps after each. DALI's contrast pivots around
mid-grey (128) instead of the image's mean grey, and its hue rotation is the linear YIQ
approximation instead of an exact HSV round trip. Interpolation is DALI's antialiased
cubic resampling (PIL's bicubic in the reference), DALI draws its own crop windows, and
its blur is a true Gaussian (window 2 ceil(3 sigma) + 1) where PIL's GaussianBlur(radius=
sigma) approximates one with box filters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.data_node import DataNode
from nvidia.dali.pipeline import OperatorConcurrency, Pipeline, StreamPolicy

from mveb.errors import UsageError

from .recipe import MultiCropRecipe, ViewSpec

OUTPUT_DTYPES = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16}

# (operator concurrency, CUDA stream policy) of DALI's executor for each `concurrency`.
_CONCURRENCY = {"backend": (OperatorConcurrency.BACKEND, StreamPolicy.PER_BACKEND),
                "full": (OperatorConcurrency.FULL, StreamPolicy.PER_OPERATOR)}


@dataclass(frozen=True)
class DALITuning:
    """How the graph runs, never what it computes: no knob changes an output's statistics.

    The defaults are best guesses for a Hopper GPU with 16 cores; measure others with a
    sweep (images/s per setting) before changing them.
    """

    # Share of JPEGs sent to the GPU's hardware JPEG decoders; the rest are Huffman-decoded
    # on the CPU threads with the IDCT on the GPU. DALI's default, 0.65, was tuned on an
    # A100 (a 5-core hardware decoder; an H100/H200 has 7 NVJPG engines) and leaves more
    # work to the CPU threads, which also run the per-sample parameter ops and share the
    # host with the trainer.
    hw_decoder_load: float = 0.8
    # Batches DALI runs ahead of the trainer: a third absorbs a slow batch (a cluster of
    # large JPEGs) for one more batch of GPU memory (about 240 MB of fp16 views at B=256).
    prefetch: int = 3
    # "backend": DALI's default, one operator at a time per backend (CPU, GPU). "full": the
    # views' independent chains run their ops concurrently, each chain on its own stream.
    concurrency: str = "backend"
    # "always": one blur per view over the whole batch, undrawn samples with an identity
    # window (no batch split); "conditional": DALI splits the batch and blurs the drawn part.
    blur: str = "always"
    # Samples per resampling kernel launch of each crop; 0 = the whole batch in one launch
    # (DALI's default, 32, launches 8 small kernels per view at B=256).
    resize_minibatch: int = 0
    # True: the local views (same size and probabilities) are stacked into one sequence per
    # sample after their crops, so colour, blur and normalize run once for all locals with
    # per-view (per-frame) parameters instead of once per local view: 3 GPU ops instead of
    # 3 x n_local, and a few vector parameter ops instead of ~15 per view. Their flips are
    # drawn here and applied by the loader. Locals with 0 < solarize p < 1 are not stacked.
    # Measured on an H200 (16 cores, 3,072 JPEGs of ~500 px, batch 256, fp16): 7,883 img/s
    # stacked vs 3,480 unstacked.
    stack_locals: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise ValueError(f"hw_decoder_load must be within [0, 1], got {self.hw_decoder_load}")
        if self.prefetch < 1 or self.resize_minibatch < 0:
            raise ValueError("prefetch must be at least 1 and resize_minibatch at least 0")
        if self.concurrency not in _CONCURRENCY:
            raise ValueError(f"concurrency must be one of {', '.join(_CONCURRENCY)}, got {self.concurrency!r}")
        if self.blur not in ("always", "conditional"):
            raise ValueError(f"blur must be 'always' or 'conditional', got {self.blur!r}")

    @classmethod
    def from_text(cls, text: str) -> "DALITuning":
        """The tuning a config or command line gives as "key=value,..." over the fields above,
        e.g. "hw_decoder_load=0.95,prefetch=2" (a sweep's result); "" keeps every default."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        chosen: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = (x.strip() for x in item.partition("="))
            if not sep or key not in defaults:
                raise UsageError(f"DALI tuning {item!r}: use key=value with a key among {', '.join(defaults)}")
            kind = type(defaults[key])
            try:
                chosen[key] = _read(value, kind)
            except ValueError:
                raise UsageError(f"DALI tuning {key}={value!r}: expected {kind.__name__}") from None
        try:
            return cls(**chosen)
        except ValueError as e:
            raise UsageError(f"DALI tuning: {e}") from None


def _read(value: str, kind: type) -> Any:
    if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(value)
        return value.lower() in ("true", "1")
    return kind(value)


def _shape(frames: int) -> dict:
    # One value per sample, or one per frame (view) of a stacked sample.
    return {"shape": [frames]} if frames else {}


def _draw(p: float, frames: int = 0) -> DataNode:
    """Per-sample (or per-frame) boolean, True with probability p."""
    return fn.random.coin_flip(probability=p, dtype=types.BOOL, **_shape(frames))


def _uniform(lo: float, hi: float, frames: int) -> DataNode | float:
    if lo == hi:  # a fixed value (e.g. data.augment=blur_sigma=2:2): DALI refuses the range [2, 2)
        return lo
    return fn.random.uniform(range=[lo, hi], **_shape(frames))


def _per_frame(arg: DataNode | float, frames: int) -> DataNode | float:
    return fn.per_frame(arg) if frames and isinstance(arg, DataNode) else arg


def _factor(strength: float, applied: DataNode, frames: int) -> DataNode | float:
    """torchvision's jitter factor for `strength` where `applied`, else 1 (no change)."""
    if strength <= 0:
        return 1.0
    # 1 + (f - 1) with f uniform in [max(0, 1 - s), 1 + s], drawn as f - 1 (one op fewer).
    return 1.0 + applied * _uniform(max(0.0, 1.0 - strength) - 1.0, strength, frames)


def _with_probability(x: DataNode, p: float, op: Callable[[DataNode], DataNode]) -> DataNode:
    # p is fixed per view, so a view that always (or never) applies an op pays no split.
    if p >= 1.0:
        return op(x)
    if p > 0.0:
        if _draw(p):
            x = op(x)
    return x


def _colour(x: DataNode, r: MultiCropRecipe, frames: int = 0) -> DataNode:
    if r.jitter_p <= 0 and r.grayscale_p <= 0:
        return x
    jitter = _draw(r.jitter_p, frames)
    saturation = _factor(r.saturation, jitter, frames)
    if r.grayscale_p > 0:
        saturation = saturation * _draw(1.0 - r.grayscale_p, frames)  # 0: desaturate to grey
    hue = 0.0
    if r.hue > 0:
        hue = jitter * _uniform(-r.hue * 360.0, r.hue * 360.0, frames)
    args = {"brightness": _factor(r.brightness, jitter, frames), "contrast": _factor(r.contrast, jitter, frames),
            "saturation": saturation, "hue": hue}
    return fn.color_twist(x, **{k: _per_frame(v, frames) for k, v in args.items()})


def _blur(x: DataNode, p: float, r: MultiCropRecipe, mode: str, frames: int = 0) -> DataNode:
    lo, hi = r.blur_sigma
    if p <= 0.0:
        return x
    if p >= 1.0:
        return fn.gaussian_blur(x, sigma=_per_frame(_uniform(lo, hi, frames), frames))
    if mode == "conditional" and not frames:
        return _with_probability(x, p, lambda v: fn.gaussian_blur(v, sigma=_uniform(lo, hi, 0)))
    # sigma = eps where the sample drew no blur: its window is 2 ceil(3 eps) + 1 = 3 taps of
    # weights exp(-1 / (2 eps^2)) = 0 (underflow), 1, 0, so the sample passes unchanged.
    # Blurred samples get eps + U[lo - eps, hi - eps] = U[lo, hi].
    eps = min(0.01, lo / 2)
    return fn.gaussian_blur(x, sigma=_per_frame(eps + _draw(p, frames) * _uniform(lo - eps, hi - eps, frames), frames))


def _solarize_table(threshold: int) -> list[int]:
    return [v if v < threshold else 255 - v for v in range(256)]


def stacks_locals(recipe: MultiCropRecipe, tuning: DALITuning) -> bool:
    """Whether the graph outputs the locals as one stacked sequence plus their flips."""
    return tuning.stack_locals and recipe.n_local > 1 and not 0.0 < recipe.local_solarize_p < 1.0


def _crop(image: DataNode, spec: ViewSpec, r: MultiCropRecipe, tuning: DALITuning, batch_size: int) -> DataNode:
    return fn.random_resized_crop(image, size=[spec.size, spec.size], random_area=list(spec.scale),
                                  random_aspect_ratio=list(r.ratio), interp_type=types.INTERP_CUBIC, antialias=True,
                                  minibatch_size=tuning.resize_minibatch or batch_size)


def _solarize(x: DataNode, p: float, r: MultiCropRecipe) -> DataNode:
    return _with_probability(x, p, lambda v: fn.lookup_table(v, keys=list(range(256)),
                                                             values=_solarize_table(r.solarize_threshold),
                                                             dtype=types.UINT8))


def _normalize(x: DataNode, r: MultiCropRecipe, out_dtype: types.DALIDataType, layout: str,
               mirror: DataNode | bool) -> DataNode:
    return fn.crop_mirror_normalize(x, mirror=mirror, mean=[255.0 * m for m in r.mean],
                                    std=[255.0 * s for s in r.std], dtype=out_dtype, output_layout=layout)


def _view(image: DataNode, spec: ViewSpec, r: MultiCropRecipe, out_dtype: types.DALIDataType,
          tuning: DALITuning, batch_size: int) -> DataNode:
    x = _colour(_crop(image, spec, r, tuning, batch_size), r)
    x = _solarize(_blur(x, spec.blur_p, r, tuning.blur), spec.solarize_p, r)
    return _normalize(x, r, out_dtype, "HWC", fn.random.coin_flip(probability=r.flip_p))


def _stacked_locals(image: DataNode, spec: ViewSpec, r: MultiCropRecipe, out_dtype: types.DALIDataType,
                    tuning: DALITuning, batch_size: int) -> tuple[DataNode, DataNode]:
    """(the n_local crops of each sample as one FHWC sequence, their [n_local] flips)."""
    n = r.n_local
    x = fn.stack(*[_crop(image, spec, r, tuning, batch_size) for _ in range(n)], axis_name="F")
    x = _solarize(_blur(_colour(x, r, n), spec.blur_p, r, "always", n), spec.solarize_p, r)
    # crop_mirror_normalize's flag flips a whole sequence; each view flips on its own draw.
    return _normalize(x, r, out_dtype, "FHWC", False), _draw(r.flip_p, n)


@pipeline_def(enable_conditionals=True, enable_checkpointing=True)
def _multicrop(file_list: str, recipe: MultiCropRecipe, decode_device: str, out_dtype: types.DALIDataType,
               shard_id: int, num_shards: int, shuffle_buffer: int, tuning: DALITuning,
               views_batch: int) -> tuple[DataNode, ...]:
    # random_shuffle: DALI first permutes the whole list with a fixed seed (so the ranks'
    # shards are disjoint whatever their seeds), then each rank draws from a buffer of
    # `shuffle_buffer` files with its own seed, a new order every epoch. pad_last_batch
    # and stick_to_shard make every epoch of a rank the same, known number of batches.
    jpegs, labels = fn.readers.file(file_list=file_list, file_root="", shard_id=shard_id, num_shards=num_shards,
                                    random_shuffle=True, initial_fill=shuffle_buffer, pad_last_batch=True,
                                    stick_to_shard=True)
    hw = {"hw_decoder_load": tuning.hw_decoder_load} if decode_device == "mixed" else {}
    image = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB, **hw)
    views = recipe.views()
    if stacks_locals(recipe, tuning):
        glob = [_view(image, spec, recipe, out_dtype, tuning, views_batch) for spec in views[:recipe.n_global]]
        return (*glob, *_stacked_locals(image, views[-1], recipe, out_dtype, tuning, views_batch), labels)
    return (*[_view(image, spec, recipe, out_dtype, tuning, views_batch) for spec in views], labels)


def build_pipeline(file_list: str, recipe: MultiCropRecipe, batch_size: int, *, device_id: int | None,
                   dtype: types.DALIDataType, seed: int, shard_id: int, num_shards: int, threads: int,
                   checkpoint: bytes | None = None, tuning: DALITuning = DALITuning()) -> Pipeline:
    """A built multi-crop pipeline; outputs are the V views (HWC) then the labels, or, when
    `stacks_locals`, the global views, the locals (FHWC), the locals' flips, the labels.

    device_id None runs everything on DALI's CPU backend. `checkpoint` (from
    `Pipeline.checkpoint()`) restores the reader position and every random generator.
    """
    concurrency, streams = _CONCURRENCY[tuning.concurrency]
    pipe = _multicrop(file_list, recipe, "cpu" if device_id is None else "mixed", dtype, shard_id, num_shards,
                      max(1024, 4 * batch_size), tuning, batch_size, batch_size=batch_size, num_threads=threads,
                      device_id=device_id, seed=seed, checkpoint=checkpoint, prefetch_queue_depth=tuning.prefetch,
                      concurrency=concurrency, stream_policy=streams)
    pipe.build()
    return pipe
