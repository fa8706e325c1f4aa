"""A fix for FFCV 1.0.2's OS-cache reader, applied when this module is imported.

`OSCacheManager.state_type` sets `mutable = False` on numba's interned `uint8[::1]` type
object itself (it meant a fresh read-only type). That changes the hash of a type numba
already uses as a dictionary key, so later compilations in the same process fail with a
KeyError inside numba's dispatcher: an FFCV pipeline thread dies on its first batch, or a
kernel compiled after a loader was built fails, or warnings appear at exit. The reader
below declares a fresh read-only type instead and leaves numba's types alone.
"""

from __future__ import annotations

from typing import Callable

import numba as nb
import numpy as np
from ffcv.memory_managers.os_cache import OSCacheManager
from ffcv.pipeline.compiler import Compiler

_READONLY_BYTES = nb.types.Array(nb.uint8, 1, "C", readonly=True)


def _state_type(self: OSCacheManager) -> nb.types.Tuple:
    return nb.types.Tuple([_READONLY_BYTES, nb.uint64[::1], nb.uint64[::1]])


def _compile_reader(self: OSCacheManager) -> Callable:
    def read(address, mem_state):
        size = mem_state[2][np.searchsorted(mem_state[1], address)]
        return mem_state[0][address:address + size]

    return Compiler.compile(read, _READONLY_BYTES(nb.uint64, _state_type(self)))


OSCacheManager.state_type = property(_state_type)
OSCacheManager.compile_reader = _compile_reader
