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
3. blur / solarize only for the samples whose coin flip says so (DALI conditionals, so a
   view with blur p=0.1 blurs a tenth of the batch, not the whole batch);
4. `crop_mirror_normalize`: flip, (x - 255 mean) / (255 std), cast to fp16/fp32, HWC.

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

from typing import Callable

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.data_node import DataNode
from nvidia.dali.pipeline import Pipeline

from .recipe import MultiCropRecipe, ViewSpec

OUTPUT_DTYPES = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16}


def _draw(p: float) -> DataNode:
    """Per-sample boolean, True with probability p."""
    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


def _factor(strength: float, applied: DataNode) -> DataNode | float:
    """torchvision's jitter factor for `strength` where `applied`, else 1 (no change)."""
    if strength <= 0:
        return 1.0
    f = fn.random.uniform(range=[max(0.0, 1.0 - strength), 1.0 + strength])
    return 1.0 + applied * (f - 1.0)


def _with_probability(x: DataNode, p: float, op: Callable[[DataNode], DataNode]) -> DataNode:
    # p is fixed per view, so a view that always (or never) applies an op pays no split.
    if p >= 1.0:
        return op(x)
    if p > 0.0:
        if _draw(p):
            x = op(x)
    return x


def _colour(x: DataNode, r: MultiCropRecipe) -> DataNode:
    if r.jitter_p <= 0 and r.grayscale_p <= 0:
        return x
    jitter = _draw(r.jitter_p)
    keep_colour = 1.0 - _draw(r.grayscale_p)
    hue = 0.0
    if r.hue > 0:
        hue = jitter * fn.random.uniform(range=[-r.hue * 360.0, r.hue * 360.0])
    return fn.color_twist(x, brightness=_factor(r.brightness, jitter), contrast=_factor(r.contrast, jitter),
                          saturation=_factor(r.saturation, jitter) * keep_colour, hue=hue)


def _solarize_table(threshold: int) -> list[int]:
    return [v if v < threshold else 255 - v for v in range(256)]


def _view(image: DataNode, spec: ViewSpec, r: MultiCropRecipe, out_dtype: types.DALIDataType) -> DataNode:
    x = fn.random_resized_crop(image, size=[spec.size, spec.size], random_area=list(spec.scale),
                               random_aspect_ratio=list(r.ratio), interp_type=types.INTERP_CUBIC, antialias=True)
    x = _colour(x, r)
    x = _with_probability(x, spec.blur_p,
                          lambda v: fn.gaussian_blur(v, sigma=fn.random.uniform(range=list(r.blur_sigma))))
    x = _with_probability(x, spec.solarize_p,
                          lambda v: fn.lookup_table(v, keys=list(range(256)),
                                                    values=_solarize_table(r.solarize_threshold),
                                                    dtype=types.UINT8))
    return fn.crop_mirror_normalize(x, mirror=fn.random.coin_flip(probability=r.flip_p),
                                    mean=[255.0 * m for m in r.mean], std=[255.0 * s for s in r.std],
                                    dtype=out_dtype, output_layout="HWC")


@pipeline_def(enable_conditionals=True, enable_checkpointing=True)
def _multicrop(file_list: str, recipe: MultiCropRecipe, decode_device: str, out_dtype: types.DALIDataType,
               shard_id: int, num_shards: int, shuffle_buffer: int) -> tuple[DataNode, ...]:
    # random_shuffle: DALI first permutes the whole list with a fixed seed (so the ranks'
    # shards are disjoint whatever their seeds), then each rank draws from a buffer of
    # `shuffle_buffer` files with its own seed, a new order every epoch. pad_last_batch
    # and stick_to_shard make every epoch of a rank the same, known number of batches.
    jpegs, labels = fn.readers.file(file_list=file_list, file_root="", shard_id=shard_id, num_shards=num_shards,
                                    random_shuffle=True, initial_fill=shuffle_buffer, pad_last_batch=True,
                                    stick_to_shard=True)
    image = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
    return (*[_view(image, spec, recipe, out_dtype) for spec in recipe.views()], labels)


def build_pipeline(file_list: str, recipe: MultiCropRecipe, batch_size: int, *, device_id: int | None,
                   dtype: types.DALIDataType, seed: int, shard_id: int, num_shards: int, threads: int,
                   checkpoint: bytes | None = None) -> Pipeline:
    """A built multi-crop pipeline; outputs are the V views (HWC) then the labels.

    device_id None runs everything on DALI's CPU backend. `checkpoint` (from
    `Pipeline.checkpoint()`) restores the reader position and every random generator.
    """
    pipe = _multicrop(file_list, recipe, "cpu" if device_id is None else "mixed", dtype, shard_id, num_shards,
                      max(1024, 4 * batch_size), batch_size=batch_size, num_threads=threads,
                      device_id=device_id, seed=seed, checkpoint=checkpoint)
    pipe.build()
    return pipe
