"""What a loader builds once from an ImageFolder and keeps: where it lives and the lock under
which one process builds it while the others wait.

Every rank of a job builds its loader at the same moment, and a requeued job builds them
again: an FFCV shard (`ffcv_loader.cached_shard`) or a full decode of the folder to find the
files DALI cannot read (`dali_loader.resolve_dali_samples`) is made once, kept under
$MVEB_CACHE_DIR (default ~/.cache/mveb), and reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sys
from pathlib import Path
from typing import IO, Iterator


def cache_dir(kind: str) -> Path:
    return Path(os.environ.get("MVEB_CACHE_DIR", Path.home() / ".cache" / "mveb")) / kind


def cache_name(folder: Path, *settings: object) -> str:
    """A name for what is built from `folder` (resolved) with `settings`: readable and unique."""
    key = "|".join(str(x) for x in (folder, *settings))
    return f"{folder.name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


@contextlib.contextmanager
def build_lock(target: Path) -> Iterator[bool]:
    """An exclusive flock beside `target` while it is built; the kernel drops it however the
    holder dies. Yields whether the lock is held: an unwritable cache or a filesystem without
    locks gets a warning, and the build goes on unlocked, where other processes may be
    building beside it."""
    with contextlib.ExitStack() as stack:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            f = stack.enter_context(_open_lock(target.with_name(f".{target.name}.lock")))
        except OSError as e:  # read-only or full: the caller's own write then fails and says so
            sys.stderr.write(f"warning: {target.parent} is not writable ({e.strerror}); "
                             "processes that start together each build it\n")
            locked = False
        else:
            locked = _flock(f, target)
        yield locked


def _open_lock(path: Path) -> IO[str]:
    try:
        return open(path, "a+")
    except PermissionError:  # another user's lock file in a shared cache: flock needs no write access
        if not path.exists():
            raise
        return open(path)


def _flock(f: IO[str], target: Path) -> bool:
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.stderr.write(f"waiting for another process building {target}\n")
            fcntl.flock(f, fcntl.LOCK_EX)
        return True
    except OSError as e:  # ENOLCK or ENOSYS: Lustre mounted without flock, NFS with nolock
        sys.stderr.write(f"warning: {target.parent} cannot be locked ({e.strerror}); "
                         "processes that start together each build it\n")
        return False
