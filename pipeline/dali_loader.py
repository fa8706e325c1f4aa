"""The DALI multi-crop loader: nvJPEG decode and GPU augmentation, or DALI's CPU backend.

`DALIMultiCropLoader` follows the `MultiCropLoader` protocol and yields `MultiCropBatch`es
built by the graph in `dali_graph.py`. DALI stops at the first file it cannot decode, so
it only ever reads validated files: for an ImageFolder root, `mveb validate`'s report
when there is a current one, else a full decode, done once and kept in the cache (broken
files are reported and left out);
a (path, label) list, e.g. `read_fix_list` of a `mveb validate --fix-list`, is trusted.

Epochs: every rank reads its own fixed shard (DALI pads the shard's last batch). Iterating
yields the current epoch from `batches_done` on; with drop_last every rank yields
(N // world_size) // batch_size batches, the same count on every rank, and the leftover
batch of the shard is run and dropped when the last counted batch is handed out, so the
state is already "next epoch, batch 0" while the trainer works on that last batch.

Resuming: `state_dict()` holds DALI's own checkpoint (reader position and every random
generator), so a restored loader yields exactly the batches the interrupted one would have.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import feed_ndarray

from mveb.errors import UsageError
from mveb.files import shown, write_atomic

from .batch import MultiCropBatch, check_loader_args, nothing_decodable
from .cache import build_lock
from .dali_graph import OUTPUT_DTYPES, DALITuning, build_pipeline, stacks_locals
from .images import Sample, list_image_folder, usable_cpus
from .recipe import MultiCropRecipe
from .torch_loader import resolve_samples
from .validate import kept_report, scan

DataSource = str | Path | Sequence[Sample]


def write_file_list(samples: Sequence[Sample], path: str | Path) -> None:
    """DALI's file_list format with absolute paths: "path label" per line (DALI takes the
    last field as the label, so paths may hold spaces)."""
    write_atomic(path, "".join(f"{os.path.abspath(p)} {y}\n" for p, y in samples))


def _from_report(report_path: Path, root: str | Path,
                 samples: list[Sample]) -> tuple[list[Sample], list[tuple[str, str]]] | None:
    """A validation report's verdict for `root` when it covers exactly as many files as the
    folder holds now; else None."""
    try:
        report = json.loads(report_path.read_text())
        reasons = {os.path.relpath(b["path"], report["root"]): b["reason"] for b in report["bad"]}
        if report["files"] != len(samples):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    good, bad = [], []
    for path, label in samples:
        why = reasons.get(os.path.relpath(path, root))
        if why is None:
            good.append((path, label))
        else:
            bad.append((path, why))
    return good, bad


def resolve_dali_samples(data: DataSource, workers: int) -> tuple[list[Sample], list[tuple[str, str]]]:
    """(files DALI may read, files left out with the reason). A folder is checked by fully
    decoding it (`mveb validate`'s scan) unless a current report says what is broken:
    `mveb validate --src FOLDER`'s beside the folder, or the one the first scan kept in the
    cache. Every rank of a job builds a loader, and a requeued job builds them again: one
    process scans while the others wait (eight ranks each decoding all of ImageNet, at each
    restart, took hours). A (path, label) list is taken as already validated."""
    if not isinstance(data, (str, Path)):
        return resolve_samples(data)[1], []
    _, samples = list_image_folder(data)
    src = Path(data).resolve()
    beside = src.parent / f"{src.name}.validate.json"
    kept = kept_report(src)
    # A file added, removed or renamed changes its class folder's mtime; the kept scan is
    # then redone (`mveb validate`'s own report is believed while the file count matches).
    newest = max([src.stat().st_mtime] + [e.stat().st_mtime for e in os.scandir(src) if e.is_dir()])

    def from_kept() -> tuple[list[Sample], list[tuple[str, str]]] | None:
        current = kept.exists() and kept.stat().st_mtime >= newest
        return _from_report(kept, data, samples) if current else None

    if (known := _from_report(beside, data, samples) or from_kept()) is not None:
        return known
    with build_lock(kept):
        if (known := from_kept()) is not None:
            return known
        result = scan(data, workers)
        try:
            write_atomic(kept, json.dumps(result.report(), indent=1) + "\n")
        except UsageError as e:  # a full or read-only cache: this start goes on without it
            sys.stderr.write(f"warning: the scan of {src} is not kept ({e}); the next start scans again\n")
    return result.good, result.bad


def _shard_size(n: int, shard: int, shards: int) -> int:
    # DALI's split of n files into shards (contiguous, sizes differ by at most one).
    return (n * (shard + 1)) // shards - (n * shard) // shards


def _torch_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device} asked for, but CUDA is not available; use --device cpu")
        return torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
    if dev.type != "cpu":
        raise UsageError(f"the DALI loader runs on cpu or cuda, not {device}")
    return dev


class DALIMultiCropLoader:
    """A `MultiCropLoader` over DALI: `device="cuda"` decodes with nvJPEG and augments on
    the GPU, `device="cpu"` runs the same graph on DALI's CPU backend.

    `data`: an ImageFolder root (scanned; broken files are reported in `skipped` and left
    out) or a list of validated (path, label), e.g. `pipeline.validate.read_fix_list(...)`.
    `workers`: DALI CPU threads (default: the cores this process may use; under DDP give
    each rank its share of the node's cores). `drop_last=False` ends each epoch with the
    shard's partial batch, so ranks may then differ by one batch: for evaluation passes.
    `tuning`: how DALI runs the graph (decoder split, prefetch, concurrency, ...); it
    changes speed, never the outputs' statistics.
    """

    def __init__(self, data: DataSource, recipe: MultiCropRecipe, batch_size: int, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                 rank: int = 0, world_size: int = 1, workers: int | None = None, drop_last: bool = True,
                 tuning: DALITuning | None = None) -> None:
        check_loader_args(batch_size, rank, world_size)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise UsageError(f"the DALI loader yields float32, float16 or bfloat16, not {dtype}")
        self.device = _torch_device(device)
        self.recipe, self.batch_size, self.dtype = recipe, batch_size, dtype
        self.seed, self.rank, self.world_size, self.drop_last = seed, rank, world_size, drop_last
        self.tuning = tuning or DALITuning()
        self._stacked = stacks_locals(recipe, self.tuning)
        self.workers = workers or usable_cpus()
        self.samples, self.skipped = resolve_dali_samples(data, self.workers)
        if self.skipped:
            path, reason = self.skipped[0]
            sys.stderr.write(f"warning: {len(self.skipped)} file(s) cannot be decoded and are left out "
                             f"(first: {shown(path)}: {reason}); `mveb validate` lists them all\n")
        self._shard = _shard_size(len(self.samples), rank, world_size)
        self.epoch, self.batches_done = 0, 0
        if not self.samples:
            raise nothing_decodable(len(self.skipped), self.skipped[0][0])  # not "lower the batch size"
        if len(self) == 0:
            raise UsageError(f"{len(self.samples)} images make no full batch of {batch_size} on each of "
                             f"{world_size} ranks; lower the batch size")
        # DALI has no bfloat16: it writes fp16 (exact for normalized pixels) and torch casts.
        self._copy_dtype = torch.float32 if dtype == torch.float32 else torch.float16
        self._tmp = tempfile.TemporaryDirectory(prefix="mveb-dali-")
        self._file_list = os.path.join(self._tmp.name, "files.txt")
        write_file_list(self.samples, self._file_list)
        self._pipe: Pipeline | None = None
        self._checkpoint: bytes | None = None  # restore the next pipeline from this

    def __len__(self) -> int:
        if self.drop_last:
            return (len(self.samples) // self.world_size) // self.batch_size
        return math.ceil(self._shard / self.batch_size)

    def _pipeline(self) -> Pipeline:
        if self._pipe is None:
            self._pipe = build_pipeline(
                self._file_list, self.recipe, self.batch_size,
                device_id=self.device.index if self.device.type == "cuda" else None,
                dtype=OUTPUT_DTYPES[self._copy_dtype], seed=self.seed + self.rank, shard_id=self.rank,
                num_shards=self.world_size, threads=self.workers, checkpoint=self._checkpoint, tuning=self.tuning)
            self._checkpoint = None
        return self._pipe

    def _stream(self) -> torch.cuda.Stream | None:
        return torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

    def _run(self, pipe: Pipeline) -> Sequence[Any]:
        # On a GPU, outputs come ordered on torch's stream: the copies below wait for DALI's
        # work there, and DALI frees the buffers only after them, without a host sync.
        stream = self._stream()
        try:
            return pipe.run() if stream is None else pipe.run(stream)
        except RuntimeError as e:
            if "decoders.image" not in str(e):
                raise
            # DALI names neither the file nor a way to skip it, and its pipeline is dead now.
            raise UsageError("DALI met an image it cannot decode (a file broke or changed after validation); "
                             "run `mveb validate --src DIR` again, then resume the run") from None

    def _skip_rest_of_epoch(self, pipe: Pipeline) -> None:
        # The reader's epoch is ceil(shard / B) batches; run what this epoch did not yield,
        # so the next epoch starts at the reader's next epoch.
        for _ in range(math.ceil(self._shard / self.batch_size) - self.batches_done):
            self._run(pipe)
        self.epoch, self.batches_done = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        """Same epoch: keep the position (resume). A new epoch starts at its first batch."""
        if epoch == self.epoch:
            return
        if self.batches_done:
            self._skip_rest_of_epoch(self._pipeline())
        self.epoch = epoch

    def __iter__(self) -> Iterator[MultiCropBatch]:
        pipe = self._pipeline()
        for _ in range(self.batches_done, len(self)):
            real = min(self.batch_size, self._shard - self.batches_done * self.batch_size)
            batch = self._to_batch(self._run(pipe), real)
            self.batches_done += 1
            if self.batches_done == len(self):
                self._skip_rest_of_epoch(pipe)
            yield batch

    def _nchw(self, buf: torch.Tensor) -> torch.Tensor:
        # NHWC memory is NCHW with channels_last strides: a view, not a copy.
        return buf.to(self.dtype).permute(0, 3, 1, 2)

    def _views(self, outs: Sequence[Any], first: int, count: int, size: int, real: int) -> torch.Tensor:
        """`count` DALI view outputs as one [count * real, 3, size, size] channels_last tensor."""
        B = self.batch_size
        buf = torch.empty((count * B, size, size, 3), dtype=self._copy_dtype, device=self.device)
        stream = self._stream()
        for i in range(count):
            # One copy per view, straight into its slot of the view-major buffer.
            feed_ndarray(outs[first + i].as_tensor(), buf[i * B:(i + 1) * B], cuda_stream=stream)
        if real < B:  # the shard's last, padded batch (drop_last=False only)
            buf = buf.view(count, B, size, size, 3)[:, :real].reshape(count * real, size, size, 3)
        return self._nchw(buf)

    def _stacked_views(self, seq: Any, flips: Any, real: int) -> torch.Tensor:
        """The locals from one [B, n, s, s, 3] output and its [B, n] flips, view-major."""
        n, s = self.recipe.n_local, self.recipe.local_size
        out = torch.empty((self.batch_size, n, s, s, 3), dtype=self._copy_dtype, device=self.device)
        feed_ndarray(seq.as_tensor(), out, cuda_stream=self._stream())
        flip = torch.from_numpy(flips.as_array()[:real].T.copy()).to(self.device, non_blocking=True)
        views = out[:real].transpose(0, 1)  # [n, real, s, s, 3]
        # One pass writes the view-major batch, each view mirrored (W is dim 3) where drawn.
        views = torch.where(flip[..., None, None, None], views.flip(3), views)
        return self._nchw(views.reshape(n * real, s, s, 3))

    def _to_batch(self, outs: Sequence[Any], real: int) -> MultiCropBatch:
        r = self.recipe
        globals_ = self._views(outs, 0, r.n_global, r.global_size, real)
        if self._stacked:
            locals_ = self._stacked_views(outs[r.n_global], outs[r.n_global + 1], real)
        else:
            locals_ = self._views(outs, r.n_global, r.n_local, r.local_size, real)
        labels = torch.from_numpy(outs[-1].as_array().reshape(-1)[:real].astype("int64"))
        return MultiCropBatch(globals_, locals_, labels.to(self.device, non_blocking=True))

    def state_dict(self) -> dict[str, Any]:
        if self._pipe is not None:
            dali = self._pipe.checkpoint()
        else:
            dali = self._checkpoint
        return {"epoch": self.epoch, "batches_done": self.batches_done, "dali": dali, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size,
                "n_samples": len(self.samples), "drop_last": self.drop_last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        same = all(state.get(k) == v for k, v in (
            ("seed", self.seed), ("rank", self.rank), ("world_size", self.world_size),
            ("batch_size", self.batch_size), ("n_samples", len(self.samples)), ("drop_last", self.drop_last)))
        # DALI's checkpoint is a reader position in one shard of one file list; it means
        # nothing for another split, so then the saved epoch restarts from its first batch.
        self.batches_done = int(state["batches_done"]) if same else 0
        self._checkpoint = state.get("dali") if same else None
        self._pipe = None
        if not same:
            sys.stderr.write("warning: loader state is from a different seed, rank, world size, batch size or "
                             "dataset; restarting the epoch from its first batch\n")
