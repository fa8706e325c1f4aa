"""Atomic writes: a file appears under its final name complete, or not at all."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from mveb.errors import UsageError


@contextlib.contextmanager
def written_atomically(path: str | Path) -> Iterator[Path]:
    """Yield a temporary name beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write text or bytes atomically; an unwritable path (a full disk, a quota) is a UsageError.

    Callers serialize in memory first: torch.save and savefig writing to a full disk raise
    errors without an errno (RuntimeError "unexpected pos"), a plain write raises OSError."""
    try:
        with written_atomically(path) as tmp:
            if isinstance(data, bytes):
                tmp.write_bytes(data)
            else:
                tmp.write_text(data)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}") from None
