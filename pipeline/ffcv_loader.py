"""FFCVMultiCropLoader: MultiCropBatch from an FFCV shard, every view cut from one decode.

Order, sharding and resumption are ours, not FFCV's: each epoch is a permutation seeded
by (seed, epoch); rank r takes every world_size-th element of it (all ranks get the same
count; the remainder of N / world_size is left out that epoch, a different few each
epoch); a restored loader skips the batches already consumed. FFCV then walks exactly
that order. Pixel randomness is keyed by (seed, epoch, sample index) inside the numba
kernels, so the same sample gets the same views whichever rank or batch reads it.

On CUDA the uint8 views travel to the GPU and are normalized there; on CPU the copy out
of FFCV's reused buffer is fused with the normalize.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numba
import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.loader import Loader
from ffcv.pipeline import PipelineSpec
from ffcv.reader import Reader
from ffcv.traversal_order.base import TraversalOrder

from mveb.errors import UsageError

from . import ffcv_fix  # noqa: F401 - must patch FFCV before any Loader is built
from .batch import MultiCropBatch, check_loader_args
from .cache import build_lock, cache_name
from .cache import cache_dir as data_cache
from .ffcv_decoder import MultiCropDecoder
from .ffcv_ops import normalize_views
from .images import usable_cpus
from .recipe import SHARD_MAX_RES, MultiCropRecipe
from .shards import build_shard, check_beton

# FFCV runs the numba pipeline from its own thread; numba's fallback "workqueue" layer
# aborts on concurrent parallel launches, OpenMP does not.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "omp"

IMAGE_FIELD = "image"
LABEL_FIELD = "label"
SHARD_QUALITY = 90


def cached_shard(folder: str | Path, cache_dir: str | Path | None = None, workers: int | None = None) -> Path:
    """The shard of an ImageFolder tree, built once into the cache and rebuilt when stale."""
    folder = Path(folder).resolve()
    cache = Path(cache_dir) if cache_dir is not None else data_cache("shards")
    shard = cache / f"{cache_name(folder, SHARD_MAX_RES, SHARD_QUALITY)}.beton"
    newest = max([folder.stat().st_mtime] + [e.stat().st_mtime for e in os.scandir(folder) if e.is_dir()])

    def stale() -> bool:
        return not shard.exists() or shard.stat().st_mtime < newest

    if stale():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            # An existing read-only folder would fail only at the write, after a full decode.
            tempfile.TemporaryFile(dir=cache).close()
        except OSError as e:
            raise UsageError(f"cannot build the FFCV shard of {folder} in {cache} ({e.strerror}): set MVEB_CACHE_DIR "
                             "to a writable folder, or build one with `mveb shards` and pass the .beton") from None
        # Without the lock every rank built the whole shard (ImageNet: 8 copies a node).
        with build_lock(shard) as locked:
            if stale():
                # A build SIGKILLed (SLURM after the grace time) leaves its temporary file, as
                # large as the shard; only the lock's holder knows no other build is using one.
                for leftover in cache.glob(f".{shard.name}.tmp-*") if locked else ():
                    leftover.unlink(missing_ok=True)
                build_shard(folder, shard, max_res=SHARD_MAX_RES, quality=SHARD_QUALITY, workers=workers)
    return shard


def ffcv_threads(workers: int | None) -> int:
    """FFCV's numba threads: `workers`, or the CPUs this job may use. Numba refuses more threads
    than the host's CPUs (NUMBA_NUM_THREADS) with a ValueError from deep inside FFCV, so the
    default data.workers=8 on a smaller node or allocation runs with what there is, and says so."""
    usable = min(usable_cpus(), numba.config.NUMBA_NUM_THREADS)
    if workers and workers > usable:
        sys.stderr.write(f"warning: {workers} FFCV workers asked for, {usable} CPUs usable here; using {usable}\n")
    return min(workers or usable, usable)


class _PlannedOrder(TraversalOrder):
    """An FFCV TraversalOrder that replays whatever order the wrapper planned next.

    FFCV calls `order(loader)` to build its traversal object, so the instance returns
    itself; `sample_order` ignores FFCV's epoch counter (ours is the one that counts).
    """

    def __init__(self, order: np.ndarray) -> None:  # no super(): FFCV's needs the loader we are building
        self.order = order

    def __call__(self, loader: Any) -> "_PlannedOrder":
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.order


class FFCVMultiCropLoader:
    """MultiCropLoader over an FFCV .beton (or an ImageFolder, sharded into a cache first)."""

    def __init__(self, data: str | Path, recipe: MultiCropRecipe, batch_size: int, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                 rank: int = 0, world_size: int = 1, workers: int | None = None, drop_last: bool = True,
                 cache_dir: str | Path | None = None) -> None:
        check_loader_args(batch_size, rank, world_size)
        if not isinstance(data, (str, Path)):
            raise UsageError("the ffcv backend reads an ImageFolder root or a .beton shard, not a list of files; "
                             "pass the folder")
        path = Path(data)
        if path.is_dir():
            path = cached_shard(path, cache_dir, workers or None)  # data.workers=0: the build may use every CPU
        reader = _open_shard(path)
        self.recipe = recipe
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.path = path
        self.num_samples = int(reader.num_samples)
        self.per_rank = self.num_samples // world_size
        if len(self) == 0:
            raise UsageError(f"{path} has {self.per_rank} samples per rank, fewer than one batch of {batch_size}; "
                             "use a smaller --batch-size")
        self._epoch = 0
        self._batches_done = 0
        self._epoch_box = np.zeros(1, np.int64)
        self._order = _PlannedOrder(self._remaining_order())
        self.decoder = MultiCropDecoder(recipe, self.seed, self._epoch_box)
        self.has_labels = LABEL_FIELD in reader.handlers
        pipelines: dict[str, Any] = {IMAGE_FIELD: PipelineSpec(IMAGE_FIELD, decoder=self.decoder)}
        for name in reader.handlers:
            if name == LABEL_FIELD:
                pipelines[name] = PipelineSpec(LABEL_FIELD, decoder=IntDecoder())
            elif name != IMAGE_FIELD:
                pipelines[name] = None
        self._ffcv = Loader(str(path), batch_size=batch_size, num_workers=ffcv_threads(workers),
                            order=self._order, pipelines=pipelines, drop_last=drop_last, batches_ahead=2,
                            os_cache=True)  # ffcv_fix patches the OS-cache reader only
        self._mean = torch.tensor(recipe.mean, device=self.device) * 255
        self._inv_std = 1 / (torch.tensor(recipe.std, device=self.device) * 255)
        self._lut = ((np.arange(256)[None, :] - np.array(recipe.mean)[:, None] * 255)
                     / (np.array(recipe.std)[:, None] * 255)).astype(np.float32)
        self._live: threading.Thread | None = None  # FFCV's EpochIterator is a thread

    # ------------------------------------------------------------------ order and state

    def __len__(self) -> int:
        if self.drop_last:
            return self.per_rank // self.batch_size
        return -(-self.per_rank // self.batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for `epoch`, in the order they are yielded."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        mine = perm[self.rank::self.world_size][: self.per_rank]
        if self.drop_last:
            mine = mine[: len(self) * self.batch_size]
        return mine.astype(np.uint64)

    def _remaining_order(self) -> np.ndarray:
        return self.epoch_order(self._epoch)[self._batches_done * self.batch_size:]

    def set_epoch(self, epoch: int) -> None:
        # Setting the epoch the loader already stands in keeps a restored mid-epoch position.
        if epoch != self._epoch:
            self._epoch = int(epoch)
            self._batches_done = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "batches_done": self._batches_done, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise UsageError(f"checkpoint loader seed {state['seed']} differs from this loader's seed {self.seed}; "
                             "resume with the same seed")
        if not 0 <= int(state["batches_done"]) <= len(self):
            raise UsageError(f"checkpoint says {state['batches_done']} batches done, but an epoch has {len(self)}")
        self._epoch = int(state["epoch"])
        self._batches_done = int(state["batches_done"])

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[MultiCropBatch]:
        self._stop_live()
        if self._batches_done >= len(self):
            self._epoch += 1
            self._batches_done = 0
        self._order.order = self._remaining_order()
        self._epoch_box[0] = self._epoch
        epoch_iter = iter(self._ffcv)
        self._live = epoch_iter
        return self._batches(epoch_iter)

    def _batches(self, epoch_iter: Any) -> Iterator[MultiCropBatch]:
        try:
            while (fields := _next_or_raise(epoch_iter)) is not None:
                batch = self._to_batch(fields[0], fields[1] if self.has_labels else None)
                self._batches_done += 1
                yield batch
        finally:
            # An abandoned generator may be collected after a newer epoch started: leave that one alone.
            if self._live is epoch_iter:
                self._stop_live()
        self._epoch += 1
        self._batches_done = 0

    def _stop_live(self) -> None:
        # A half-read epoch's FFCV thread must stop before the epoch box changes under it.
        if self._live is not None:
            epoch_iter, self._live = self._live, None
            epoch_iter.close()
            epoch_iter.join(timeout=60)

    def _to_batch(self, images: np.ndarray, labels: np.ndarray | None) -> MultiCropBatch:
        r = self.recipe
        split = r.n_global * r.global_size * r.global_size * 3
        if self.device.type == "cpu":
            globals_ = self._normalized_cpu(images, 0, r.n_global, r.global_size)
            locals_ = self._normalized_cpu(images, split, r.n_local, r.local_size)
        else:
            raw = torch.from_numpy(images).to(self.device, non_blocking=True)
            globals_ = self._normalized(raw[:, :split], r.n_global, r.global_size)
            locals_ = self._normalized(raw[:, split:], r.n_local, r.local_size)
        lab = None
        if labels is not None:
            lab = torch.from_numpy(labels.reshape(-1).astype(np.int64)).to(self.device)
        return MultiCropBatch(globals_, locals_, lab)

    def _normalized(self, raw: torch.Tensor, n: int, size: int) -> torch.Tensor:
        """[B, n*size*size*3] uint8 (HWC per view) -> [n*B, 3, size, size] channels_last, view-major."""
        b = raw.shape[0]
        out = torch.empty((n, b, size, size, 3), dtype=torch.float32, device=self.device)
        out.copy_(raw.view(b, n, size, size, 3).transpose(0, 1))
        out.sub_(self._mean).mul_(self._inv_std)  # in fp32: a bf16 mean * 255 would be off by ~0.3
        return self._nchw(out)

    def _normalized_cpu(self, images: np.ndarray, start: int, n: int, size: int) -> torch.Tensor:
        out = torch.empty((n, images.shape[0], size, size, 3), dtype=torch.float32)
        if out.numel():
            normalize_views(images, start, n, size, self._lut, out.numpy().reshape(n, images.shape[0], -1))
        return self._nchw(out)

    def _nchw(self, out: torch.Tensor) -> torch.Tensor:
        n, b, size = out.shape[:3]
        return out.to(self.dtype).view(n * b, size, size, 3).permute(0, 3, 1, 2)


def _next_or_raise(epoch_iter: Any) -> Any:
    """FFCV's next batch, or None at the end of the epoch.

    FFCV's consumer waits on its queue forever when the pipeline thread dies (its
    exception only goes to stderr), so wait here while watching that the thread lives.
    """
    while epoch_iter.output_queue.qsize() == 0 and epoch_iter.is_alive():
        time.sleep(0.002)
    if epoch_iter.output_queue.qsize() == 0:
        raise RuntimeError("the FFCV pipeline thread died (its error is printed above)")
    try:
        return next(epoch_iter)
    except StopIteration:
        return None


def _open_shard(path: Path) -> Any:
    if not path.exists():
        raise UsageError(f"{path} does not exist; pass an FFCV .beton shard or an ImageFolder root")
    check_beton(path)
    reader = Reader(str(path))
    if IMAGE_FIELD not in reader.handlers:
        raise UsageError(f"{path} has no '{IMAGE_FIELD}' field (fields: {', '.join(reader.handlers)}); "
                         "build it with mveb shards")
    return reader
