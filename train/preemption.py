"""Stop at the next step boundary on SIGTERM or SIGUSR2 (SLURM preemption and time limits).

The handler only sets a flag; the loop checks it between steps, saves a checkpoint and
returns, so a signal never lands in the middle of an optimizer step or a checkpoint write.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import signal
import sys
from contextlib import contextmanager
from types import FrameType
from typing import Any, Iterator

SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class PreemptionFlag:
    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "PreemptionFlag":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is None:
            sys.stderr.write(f"received {signal.Signals(signum).name}: checkpointing at the next step boundary\n")
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @staticmethod
    @contextmanager
    def shield_children() -> Iterator[None]:
        """Block the signals while loader worker processes may be forked.

        SLURM signals every process of a job step, DataLoader workers included, and a
        worker killed by SIGTERM/SIGUSR2 makes the trainer raise mid-step. Children forked
        here inherit the blocked mask and never see the signal; the trainer gets it as soon
        as the block lifts, and shuts its workers down itself.
        """
        _kill_shielded_children_at_exit()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@functools.cache
def _kill_shielded_children_at_exit() -> None:
    """At exit, multiprocessing stops daemonic children (DataLoader workers) with SIGTERM and
    then joins them; shielded workers never see it, and the join waits forever. That is the exit
    after an error raised mid-epoch: the traceback keeps the loader's iterator (and its
    workers) alive. atexit runs handlers last-registered first, so this one, registered after
    multiprocessing's, kills them before that join."""
    def kill() -> None:
        # DataLoader's SIGCHLD handler would report each kill as a worker failure.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for child in multiprocessing.active_children():
            if child.daemon:
                child.kill()

    atexit.register(kill)
