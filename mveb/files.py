"""Atomic writes: a file appears under its final name complete, or not at all; and the check,
before the work, that it could be written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from mveb.errors import UsageError


def shown(path: str | Path) -> str:
    """A path as one printable line: a name's line break or non-UTF-8 byte (a surrogate) is
    escaped, as printing it would break the line or, on stdout, raise."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(path))


def output_target(path: str | Path) -> Path:
    """Where a write to `path` must land: a symlink's target (renaming onto the link would
    replace the link, and leave its target stale), never a device or a pipe (renaming onto
    /dev/null as root replaces the machine's /dev/null with a file)."""
    path = Path(os.path.realpath(path))
    if path.exists() and not path.is_file() and not path.is_dir():
        raise UsageError(f"{path} is not a regular file (a device, a pipe or a socket); give a file name")
    return path


@contextlib.contextmanager
def written_atomically(path: str | Path) -> Iterator[Path]:
    """Yield a temporary name beside `path` (a symlink's target); rename it onto that only if
    the block succeeds."""
    path = output_target(path)
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


def check_writable(path: str | Path | None, option: str, folder: bool = False) -> None:
    """A one-line UsageError now when `path` (a file, or with folder=True a folder) could not be
    written later, so a command says so before its minutes of work, not after them.
    Creates nothing: the nearest existing folder above is probed (the write makes the rest).
    None (the option not given) passes."""
    if path is None:
        return
    path = base = Path(path).absolute()
    try:  # stat too can fail (a folder above that may not be searched)
        if not folder and path.is_dir():
            raise UsageError(f"{option} {path} is a folder; give a file name")
        if not folder:
            try:
                path = base = output_target(path)
            except UsageError as e:
                raise UsageError(f"{option} {e}") from None
        base = next(p for p in (path if folder else path.parent, *path.parents) if p.exists())
        if not base.is_dir():
            raise UsageError(f"{option} {path}: {base} is not a folder")
        # A real file, not os.access: root passes access() where the filesystem still refuses (/proc).
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise UsageError(f"{option} {path}: cannot write in {base} ({e.strerror or e})") from None
