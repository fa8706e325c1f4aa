"""`mveb shards`: an ImageFolder tree as one FFCV .beton (RGBImageField JPEG + IntField label).

FFCV's writer hangs forever when a worker meets a file it cannot decode, and its resizer
makes a zero-width image from an extreme aspect ratio, so the writer only ever sees
images we decoded, rotated upright, converted to 8-bit RGB and resized ourselves, from the
validator's good list. The write runs in its own process group under a timeout, into a
temporary name renamed at the end; `OUT.report.json` lists what was written and skipped.
A writer worker that fails (a full disk, a file deleted since the scan) also leaves FFCV
waiting forever for its allocations, so its error is written down and the whole group killed:
the command fails at once with that error instead of at the timeout.

On a SLURM cluster, build ImageNet's train shard on one big CPU node (the writer scales
with --workers; there is no cross-node step):
    sbatch -c 64 --mem 128G -t 4:00:00 --wrap "mveb shards --src /data/imagenet/train \
        --out /data/imagenet/train.beton --workers 64"
or `python slurm/launch.py shards ...`, which submits the same call.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageOps

from mveb.errors import UsageError
from mveb.files import check_writable, output_target, shown, write_atomic

from .images import Sample, decoding_processes, read_class_file, to_rgb8
from .recipe import SHARD_MAX_RES
from .validate import scan


def open_for_shard(path: str, max_res: int) -> np.ndarray:
    """Decode upright 8-bit RGB, longest side at most max_res, as HWC uint8."""
    with Image.open(path) as img:
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still leaves >= max_res.
        img.draft("RGB", (max_res, max_res))
        img = to_rgb8(ImageOps.exif_transpose(img))
    longest = max(img.size)
    if longest > max_res:
        scale = max_res / longest
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


class ShardSource:
    """What FFCV's writer indexes: (HWC uint8 image, label) per sample, already decoded."""

    def __init__(self, samples: Sequence[Sample], max_res: int) -> None:
        self.samples, self.max_res = samples, max_res

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[i]
        return open_for_shard(path, self.max_res), label


def _write(tmp: str, samples: Sequence[Sample], max_res: int, quality: int, workers: int, progress: bool,
           error: Any) -> None:
    os.setpgid(0, 0)  # our own group, so a timeout kills FFCV's workers too
    import ffcv.writer
    from ffcv.fields import IntField, RGBImageField  # already imported by the parent: free after fork
    from ffcv.writer import DatasetWriter

    if not progress:  # FFCV's writer always draws a bar; silence it in this child only
        ffcv.writer.tqdm = partial(ffcv.writer.tqdm, disable=True)

    class Writer(DatasetWriter):
        def prepare(self) -> None:
            super().prepare()
            # Name the writer's shared memory, so the parent can free it if it must kill us.
            Path(f"{tmp}.shm").write_text(self.metadata_sm.name)

        def _write_common(self, num_samples: int, queue_content: Any, work_fn: Callable, extra: tuple) -> None:
            super()._write_common(num_samples, queue_content, partial(_fail_fast, error, work_fn), extra)

    fields = {"image": RGBImageField(write_mode="jpg", jpeg_quality=quality), "label": IntField()}
    Writer(tmp, fields, num_workers=workers).from_indexed_dataset(
        ShardSource(samples, max_res), chunksize=max(1, min(100, len(samples) // (workers * 4))))


def _fail_fast(error: Any, work_fn: Callable, *args: Any) -> None:
    """Run an FFCV writer worker; on an error, leave its one line for the parent and kill the group.

    `error` is shared memory, not a file: the disk that failed the write would refuse it too."""
    try:
        work_fn(*args)
    except Exception as e:
        if isinstance(e, OSError) and e.strerror:
            line = e.strerror + (f": {e.filename}" if e.filename else "")
        else:
            line = f"{type(e).__name__}: {e}"
        error.value = line.encode()[:len(error) - 1]
        os.killpg(0, signal.SIGKILL)


def default_timeout(n_images: int, workers: int) -> float:
    """Generous (a write costs ~5 ms of CPU per image here, 50x less), so only a hang reaches it."""
    return 300.0 + 0.25 * n_images / workers


def write_beton(out: Path, samples: Sequence[Sample], max_res: int, quality: int, workers: int,
                timeout_s: float, progress: bool = True) -> None:
    """FFCV-write `samples` to `out` via a temporary name; nothing under `out` on failure."""
    import multiprocessing as mp

    import ffcv.writer  # noqa: F401 - imported once here (seconds of numba) rather than in the child

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    kept: Path | None = None
    ctx = mp.get_context("fork")
    error = ctx.Array("c", 512, lock=False)
    proc = ctx.Process(target=_write, args=(str(tmp), samples, max_res, quality, workers, progress, error))
    proc.start()
    restore_sigterm = _interrupt_on_sigterm()
    try:
        proc.join(timeout_s)
        if proc.is_alive():
            raise RuntimeError(f"the FFCV writer did not finish within {timeout_s:g} s and was killed; "
                               f"nothing was written to {out}")
        if proc.exitcode != 0:
            why = error.value.decode(errors="replace") or f"exit code {proc.exitcode}"
            raise RuntimeError(f"the FFCV writer failed ({why}); nothing was written to {out}")
        try:
            os.replace(tmp, out)
        except OSError as e:  # an immutable file, another user's in a sticky folder: keep the hours of work
            kept = out.with_name(f"{out.stem}.new{out.suffix}")
            try:
                os.replace(tmp, kept)
            except OSError:
                kept = tmp
            raise RuntimeError(f"the shard is complete but cannot replace {out} ({e.strerror}); "
                               f"it is kept as {kept}") from None
    finally:
        # Also on Ctrl-C or SIGTERM (scancel): the writer's own group receives neither.
        restore_sigterm()
        if proc.is_alive():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.join()
        if proc.exitcode != 0:  # killed by us or by a failing worker, before it freed its shared memory
            _free_shared_memory(Path(f"{tmp}.shm"))
        if kept != tmp:
            tmp.unlink(missing_ok=True)
        Path(f"{tmp}.shm").unlink(missing_ok=True)


def _interrupt_on_sigterm() -> Callable[[], None]:
    """Turn SIGTERM into KeyboardInterrupt, so cleanup runs; returns what undoes it. Off the
    main thread Python cannot set handlers, and nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _free_shared_memory(name_file: Path) -> None:
    from multiprocessing import shared_memory

    try:
        shm = shared_memory.SharedMemory(name=name_file.read_text())
    except (OSError, ValueError):
        return  # killed before it allocated any
    shm.close()
    shm.unlink()


def _choose(samples: list[Sample], limit: int | None) -> list[Sample]:
    """At most `limit` samples, a seeded random subset (so every class is represented)."""
    if limit is None or limit >= len(samples):
        return samples
    keep = np.sort(np.random.default_rng(0).choice(len(samples), size=limit, replace=False))
    return [samples[i] for i in keep]


def check_shard_options(max_res: int, quality: int, limit: int | None, timeout_s: float | None) -> None:
    """UsageError for a bad --max-res, --quality, --limit or --timeout; slurm/launch.py checks them
    too, before it submits a job that would only fail once it runs."""
    if max_res < 8:
        raise UsageError(f"--max-res must be at least 8, got {max_res}")
    if not 1 <= quality <= 100:
        raise UsageError(f"--quality must be in 1..100, got {quality}")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    if timeout_s is not None and not timeout_s > 0:
        raise UsageError(f"--timeout must be a positive number of seconds, got {timeout_s}")


def build_shard(src: str | Path, out: str | Path, max_res: int = SHARD_MAX_RES, quality: int = 90,
                workers: int | None = None, limit: int | None = None,
                classes: str | Path | list[str] | None = None, timeout_s: float | None = None,
                progress: bool = True) -> dict:
    """Validate `src`, write every decodable image to `out`, return (and write) the report.

    `classes`: class folder names in label order, or a file with one per line; folders
    not listed are left out. The report is {"written", "skipped": [{"path", "reason"}],
    "classes", "seconds", ...}, also saved as OUT.report.json.
    """
    start = time.perf_counter()
    out = Path(out)
    check_shard_options(max_res, quality, limit, timeout_s)
    workers = decoding_processes(workers)
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name such as {out / 'train.beton'}")
    check_writable(out, "--out")  # FFCV's writer would fail only after the scan, with a traceback
    out = output_target(out)  # written through a symlink, not over it
    out.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(classes, (str, Path)):
        classes = read_class_file(classes)

    result = scan(src, workers, classes, progress=progress)
    samples = _choose(result.good, limit)
    if not samples:
        raise UsageError(f"no decodable image under {src} ({len(result.bad)} broken files); see `mveb validate`")
    write_beton(out, samples, max_res, quality, workers,
                timeout_s if timeout_s is not None else default_timeout(len(samples), workers), progress)
    seconds = time.perf_counter() - start
    report = {"written": len(samples), "skipped": [{"path": p, "reason": r} for p, r in result.bad],
              "classes": result.classes, "src": str(src), "max_res": max_res, "quality": quality,
              "seconds": round(seconds, 3), "seconds_per_1000": round(1000 * seconds / len(samples), 3),
              "scan_seconds": round(result.seconds, 3), "workers": workers}
    write_atomic(Path(f"{out}.report.json"), json.dumps(report, indent=1) + "\n")
    return report


def shards_command(src: str, out: str, max_res: int, quality: int, workers: int | None, limit: int | None,
                   classes: str | None, timeout_s: float | None = None) -> int:
    try:
        report = build_shard(src, out, max_res, quality, workers, limit, classes, timeout_s)
    except RuntimeError as e:
        print(f"mveb shards: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {report['written']} images to {out} in {report['seconds']:.1f} s "
          f"({report['seconds_per_1000']:.1f} s per 1,000); skipped {len(report['skipped'])} broken files; "
          f"report: {out}.report.json")
    for s in report["skipped"][:10]:
        print(f"  skipped: {shown(s['path'])}: {s['reason']}", file=sys.stderr)
    return 0


def check_beton(path: str | Path) -> None:
    """UsageError unless `path` is a complete FFCV file (header, fields, allocation table)."""
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    size = path.stat().st_size
    bad = f"{path} is not a complete FFCV shard"
    with open(path, "rb") as f:
        raw = f.read(HeaderType.itemsize)
        if len(raw) < HeaderType.itemsize:
            raise UsageError(f"{bad} (only {size} bytes); rebuild it with `mveb shards`")
        header = np.frombuffer(raw, dtype=HeaderType)[0]
        fields_end = HeaderType.itemsize + int(header["num_fields"]) * FieldDescType.itemsize
        table_bytes = size - int(header["alloc_table_ptr"])
        if (header["version"] != CURRENT_VERSION or not 0 < header["num_fields"] < 256
                or not fields_end <= header["alloc_table_ptr"] <= size or table_bytes % ALLOC_TABLE_TYPE.itemsize):
            raise UsageError(f"{bad} (bad header: truncated, still being written, or another format); "
                             "rebuild it with `mveb shards`")
        f.seek(int(header["alloc_table_ptr"]))
        table = np.frombuffer(f.read(table_bytes), dtype=ALLOC_TABLE_TYPE)
    if len(table) and int((table["ptr"] + table["size"]).max()) > int(header["alloc_table_ptr"]):
        raise UsageError(f"{bad} (data past its allocation table: truncated); rebuild it with `mveb shards`")
    if header["num_samples"] == 0:
        raise UsageError(f"{path} holds no samples")
