"""One job per run folder: a second job on the same --out (a duplicate sbatch, a requeued job
whose old allocation still runs) would interleave its checkpoints and metrics with the first.

Rank 0 holds an exclusive flock on RUN/.lock for the whole run; the kernel drops it when the
process dies, however it dies, so a crash or a SIGKILL never leaves a stale lock. A filesystem
without locks (some NFS or Lustre mounts) gets a warning and no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as torch_dist

from mveb.errors import UsageError

from .distributed import DistInfo


@contextlib.contextmanager
def hold_run_folder(run_dir: Path, dist: DistInfo) -> Iterator[None]:
    """Lock `run_dir` on rank 0 for the block; every rank raises the same UsageError if another job holds it."""
    with contextlib.ExitStack() as stack:
        busy = ""
        if dist.is_main:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UsageError(f"cannot create {run_dir}: {e.strerror}") from None
            f = stack.enter_context(open(run_dir / ".lock", "a+"))
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                f.truncate(0)
                f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
                f.flush()
            except BlockingIOError:
                f.seek(0)
                busy = f.read().strip() or "another process"
            except OSError as e:
                sys.stderr.write(f"warning: {run_dir} cannot be locked ({e.strerror}); "
                                 "make sure no other job trains into it\n")
        if dist.is_distributed:  # the other ranks must not go on into collectives rank 0 never joins
            flag = torch.tensor([int(bool(busy))], device=dist.device)
            torch_dist.all_reduce(flag)
            busy = busy or ("another job" if flag.item() else "")
        if busy:
            raise UsageError(f"{run_dir} is in use by {busy}: wait for that job to end, or pass another --out")
        yield
