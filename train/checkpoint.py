"""Checkpoints that survive a kill at any moment.

A checkpoint is written to a temporary name, fsynced, then renamed into place
(RUNDIR/checkpoints/step_00001234.pt), and only the newest two are kept. A process killed
mid-write leaves a temporary file that nothing reads; the previous checkpoint still loads.
Loading uses weights_only=True, so a checkpoint holds tensors and plain Python values only.
"""

from __future__ import annotations

import io
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from mveb.errors import UsageError

KEEP = 2
_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def is_checkpoint_path(path: str | Path) -> bool:
    """Whether a file at `path` would be taken for one of its run's checkpoints."""
    path = Path(path)
    return path.parent.name == checkpoint_dir("").name and bool(_NAME.match(path.name))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: str | Path, state: dict[str, Any], step: int) -> Path:
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"step_{step:08d}.pt"
    # Serialized in memory first: torch.save writing to a full disk raises a RuntimeError with
    # no errno ("unexpected pos ..."), a plain write raises OSError(ENOSPC), which callers handle.
    data = io.BytesIO()
    torch.save(state, data)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(d)
    for old in checkpoints(run_dir)[:-KEEP]:
        old.unlink(missing_ok=True)
    # Temporary files of writers killed mid-save (rank 0 is the only writer of a run).
    for stale in d.glob(".step_*.tmp"):
        stale.unlink(missing_ok=True)
    return final


def _fsync_dir(d: Path) -> None:
    # The rename itself is durable only once the directory entry is on disk.
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist; pass --resume auto or an existing .pt file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file: report it, never a traceback
        raise UsageError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def load_latest(run_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint of a run; an unreadable one is reported and skipped."""
    for path in reversed(checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path, map_location)
        except UsageError as e:
            sys.stderr.write(f"warning: skipping {e}\n")
    return None
