"""Run logs: RUNDIR/metrics.jsonl (one JSON object per logged step) and TensorBoard events.

On resume the log is cut back to the checkpoint's step first, so steps trained after the
last checkpoint and trained again are logged once, from the resumed run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from mveb.files import write_atomic


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records after `last_step` (and any torn last line from a kill mid-write)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line)
    write_atomic(path, "".join(line + "\n" for line in kept))


class MetricsLog:
    def __init__(self, run_dir: Path, resume_step: int, tensorboard: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        truncate_metrics(self.path, resume_step)
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a previous attempt wrote past the checkpoint.
            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        """Append a record; a failed write (a full disk) warns and training goes on: a torn line
        is dropped by truncate_metrics on the next resume."""
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:
            sys.stderr.write(f"warning: step {record['step']} not logged to {self.path} ({e.strerror or e})\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
