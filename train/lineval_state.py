"""The --out folder of a resumable linear evaluation, and the preemption stop it makes.

    DIR/settings.json          what defines the run, written first; a rerun must match it
    DIR/features_val.pt        centre-crop val features (and with --precompute features_train.pt):
                               fp32 as extracted, so a resumed run trains on the same numbers
                               as an uninterrupted one; removed once the run has its result
    DIR/checkpoints/step_N.pt  head, SGD and scheduler state, epoch and batch offset, written by
                               train/checkpoint.py (temporary name, fsync, rename; newest two kept)
    DIR/lineval.json           the final result: its presence means the run is complete

A folder that holds checkpoints but no settings.json (a pretraining run folder, say) is
refused rather than resumed: save_checkpoint would prune that run's checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mveb.errors import UsageError
from mveb.files import write_atomic, written_atomically
from train.checkpoint import checkpoint_dir, latest_checkpoint, load_latest, save_checkpoint
from train.features import Features
from train.knn import write_result
from train.preemption import PreemptionFlag

RESULT = "lineval.json"
SETTINGS = "settings.json"


class Preempted(Exception):
    """A run stopped on SIGTERM/SIGUSR2 after saving; str() is the one line to print."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signal = signum


def run_settings(backbone: nn.Module, checkpoint: str | None, train: str, val: str, image_size: int,
                 batch_size: int, epochs: int, lr: float, precompute: bool, seed: int) -> dict[str, Any]:
    """The settings a resume must repeat, in the order a mismatch is reported.

    Paths are resolved so that a requeued job started from another directory still matches;
    the weights' digest catches a run folder whose newest checkpoint moved on since.
    """
    digest = hashlib.sha256()
    for name, tensor in backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return {"checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
            "backbone_sha256": digest.hexdigest(), "arch": getattr(backbone, "arch_name", None),
            "image_size": image_size, "batch_size": batch_size, "epochs": epochs, "lr": lr,
            "precompute": precompute, "train": str(Path(train).resolve()), "val": str(Path(val).resolve()),
            "seed": seed}


def _mismatch(out: Path, key: str, saved: Any, now: Any) -> UsageError:
    if key == "backbone_sha256":
        return UsageError(f"{out} was started with other backbone weights than the checkpoint holds now (a run "
                          "folder's newest checkpoint changes as it trains: pass a checkpoint file); use a new --out")
    flag = "seed" if key == "seed" else "--" + key.replace("_", "-")
    if isinstance(saved, bool):
        was = f"{'with' if saved else 'without'} {flag}"
    else:
        was = f"with {flag} {'unset' if saved is None else saved}, not {'unset' if now is None else now}"
    return UsageError(f"{out} was started {was}: rerun with its settings, or pass a new --out")


class LinevalRun:
    """One --out folder: settings check, feature cache, head state saves, the preemption flag.

    Use as a context manager: inside it SIGTERM/SIGUSR2 only set a flag, which `after_batch`
    and `features` turn into a save and a `Preempted` stop.
    """

    def __init__(self, out: str | Path, settings: dict[str, Any], checkpoint_minutes: float) -> None:
        self.out, self.settings = Path(out), settings
        self.every_s = 60 * checkpoint_minutes
        self.flag = PreemptionFlag()
        settings_file = self.out / SETTINGS
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"--out {self.out} is a file; lineval's --out is a folder (new, or a lineval run's)")
        if settings_file.exists():
            try:
                saved = json.loads(settings_file.read_text())
            except (OSError, ValueError) as e:
                raise UsageError(f"{settings_file} cannot be read ({e}); pass a new --out") from None
            for key, now in settings.items():
                if saved.get(key) != now:
                    raise _mismatch(self.out, key, saved.get(key), now)
        elif checkpoint_dir(self.out).exists():
            raise UsageError(f"{self.out} holds checkpoints but no {SETTINGS}: not a lineval --out folder "
                             "(a pretraining run?); pass a new --out")
        else:
            write_atomic(settings_file, json.dumps(settings, indent=2) + "\n")
        # Feature files of a writer killed mid-save: as large as the features themselves.
        for stale in self.out.glob(".features_*.tmp*"):
            stale.unlink(missing_ok=True)
        self._last_save = time.monotonic()

    def __enter__(self) -> "LinevalRun":
        self.flag.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.flag.__exit__(*exc)

    def result(self) -> dict[str, Any] | None:
        """The stored result of a completed run, or None."""
        path = self.out / RESULT
        if not path.exists():
            return None
        sys.stderr.write(f"{self.out} is complete: printing its stored result (pass a new --out to evaluate again)\n")
        return json.loads(path.read_text())

    def features(self, split: str, extract: Callable[[], Features]) -> Features:
        """Cached features of `split`, or `extract()` (signals blocked, so that loader workers
        forked for it survive a job-wide SIGTERM) saved for the next run."""
        path = self.out / f"features_{split}.pt"
        if path.exists():
            try:
                return Features(**torch.load(path, map_location="cpu", weights_only=True))
            except Exception as e:  # a file cut short by a crash: extract again rather than fail
                sys.stderr.write(f"warning: {path} cannot be read ({type(e).__name__}); extracting again\n")
        with self.flag.shield_children():
            feats = extract()
        try:
            with written_atomically(path) as tmp, open(tmp, "wb") as f:
                torch.save(vars(feats), f)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as e:  # torch.save on a full disk raises RuntimeError
            sys.stderr.write(f"warning: {path} not written ({e}); a resumed run extracts again\n")
        if self.flag.requested:
            raise Preempted(self.flag.signal, f"stopped on {self._signal_name()} after extracting {split} features "
                                              f"into {path}; rerun the same command to resume")
        return feats

    def drop_features(self) -> None:
        """The feature cache is only for resuming; on ImageNet it is gigabytes of someone's quota."""
        for path in self.out.glob("features_*.pt"):
            path.unlink(missing_ok=True)

    def load_state(self, steps_per_epoch: int) -> dict[str, Any] | None:
        """The newest saved head state, or None for a fresh start."""
        found = load_latest(self.out)
        if found is None:
            return None
        path, state = found
        if state["steps_per_epoch"] != steps_per_epoch:
            raise UsageError(f"--train {self.settings['train']} changed since {self.out} was started "
                             f"({steps_per_epoch} batches an epoch now, {state['steps_per_epoch']} then); "
                             "pass a new --out")
        sys.stderr.write(f"resuming from {path} (epoch {state['epoch'] + 1}/{self.settings['epochs']}, "
                         f"{state['batch']} batches done)\n")
        return state

    def save_state(self, state: dict[str, Any], step: int) -> Path | None:
        """Save; a failed write (full disk, quota) warns and returns None, the previous state stays."""
        self._last_save = time.monotonic()
        try:
            return save_checkpoint(self.out, state, step)
        except OSError as e:
            sys.stderr.write(f"warning: lineval state at step {step} not written ({e.strerror or e}); "
                             "the previous one is kept\n")
            return None

    def after_batch(self, state: Callable[[], dict[str, Any]], step: int, where: str) -> None:
        """Save if --checkpoint-minutes passed or a signal came; on a signal, stop with `Preempted`."""
        if not self.flag.requested and time.monotonic() - self._last_save < self.every_s:
            return
        path = self.save_state(state(), step)
        if not self.flag.requested:
            return
        saved = (f"saved {path}" if path is not None else
                 f"the state could not be saved, the newest on disk is {latest_checkpoint(self.out) or 'none'}")
        raise Preempted(self.flag.signal, f"stopped on {self._signal_name()} after {where}; {saved}; "
                                          "rerun the same command to resume")

    def _signal_name(self) -> str:
        return signal.Signals(self.flag.signal).name


def store_result(out: str | Path, result: dict[str, Any]) -> None:
    """Write DIR/lineval.json (atomically), unless this run only printed the stored one."""
    path = Path(out) / RESULT
    if not path.exists():
        write_result(str(path), result)
