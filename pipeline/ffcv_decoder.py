"""An FFCV decoder that decodes each image once and cuts all V multi-crop views from it.

FFCV's own RandomResizedCropRGBImageDecoder makes one view per decode, so 8 views would
decode every JPEG 8 times. This Operation decodes into a scratch buffer and hands the
pixels to `ffcv_ops.augment_sample`, which writes every view (crop, flip, colour, blur,
solarize) into one flat uint8 row per sample: view v occupies offsets[v]:offsets[v + 1]
as HWC. The loader splits that row into the globals and locals of a MultiCropBatch.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np
from numba import set_parallel_chunksize
from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.libffcv import ctypes_imdecode, ctypes_memcopy
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State

from .ffcv_ops import augment_batch, recipe_tables
from .recipe import MultiCropRecipe


class MultiCropDecoder(Operation):
    """Decode once, augment every view. `epoch` is read at run time from `epoch_box`.

    Numba freezes captured arrays as constants, so the epoch (which changes after the
    pipeline is compiled) is copied in through the box's address with FFCV's memcpy.
    """

    def __init__(self, recipe: MultiCropRecipe, seed: int, epoch_box: np.ndarray) -> None:
        super().__init__()
        if epoch_box.dtype != np.int64 or epoch_box.shape != (1,):
            raise ValueError("epoch_box must be an int64 array of shape (1,)")
        self.views, self.offsets, self.shared = recipe_tables(recipe)
        self.seed = int(seed)
        self.epoch_box = epoch_box

    @property
    def sample_bytes(self) -> int:
        return int(self.offsets[-1])

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        # uint64 so that max_height * max_width * 3 cannot overflow uint16 metadata.
        max_pixels = np.uint64(self.metadata["width"].max()) * np.uint64(self.metadata["height"].max())
        out_shape = (self.sample_bytes,)
        u8 = np.dtype("<u1")
        return (
            replace(previous_state, jit_mode=True, shape=out_shape, dtype=u8),
            (AllocationQuery(out_shape, u8), AllocationQuery((max_pixels * np.uint64(3),), u8)),
        )

    def generate_code(self) -> Callable:
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        jpg = IMAGE_MODES["jpg"]
        views, offsets, shared, seed = self.views, self.offsets, self.shared, self.seed
        epoch_addr = self.epoch_box.ctypes.data
        copy_bytes = ctypes_memcopy
        decode_c = ctypes_imdecode

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, scratch = my_storage
            n = len(batch_indices)
            epoch_now = np.empty(1, np.int64)
            copy_bytes(epoch_addr, epoch_now.ctypes.data, 8)
            shapes = np.empty((n, 2), np.int64)
            for dst_ix in my_range(n):
                field = metadata[batch_indices[dst_ix]]
                data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                shapes[dst_ix, 0] = height
                shapes[dst_ix, 1] = width
                if field["mode"] == jpg:
                    # libffcv's C entry point directly: FFCV's `imdecode` wrapper would be one
                    # more numba dispatcher to compile for every loader.
                    dst = scratch[dst_ix]
                    decode_c(data.ctypes.data, data.size, height, width, dst.ctypes.data, height, width,
                             0, 0, 1, 1, False, False)
                else:
                    scratch[dst_ix][: data.size] = data
            # Chunks of one sample: views vary in cost (blur, jitter) and a thread may be
            # preempted on a shared machine, so threads take samples as they free up
            # instead of fixed halves (2x images/s on a busy 2-core machine).
            previous = set_parallel_chunksize(1)
            augment_batch(scratch[:n], shapes, destination[:n], views, offsets, shared, seed, epoch_now[0],
                          batch_indices)
            set_parallel_chunksize(previous)
            return destination[:n]

        decode.is_parallel = True
        return decode
