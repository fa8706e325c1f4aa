"""`pretrain(cfg)`: the MVEB pretraining loop, top to bottom.

Resumes from the newest checkpoint of cfg.run.out (or an explicit one), trains to
cfg.schedule.steps (or the end of the schedule), checkpoints every N steps, every M
minutes, on SIGTERM/SIGUSR2 at the next step boundary, and at the end.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from tqdm import tqdm

from mveb.devices import step_stream
from mveb.errors import UsageError
from mveb.files import write_atomic
from pipeline.images import usable_cpus
from pipeline.loaders import build_loader

from .checkpoint import latest_checkpoint, load_checkpoint, load_latest, save_checkpoint
from .config import Config, check_config
from .distributed import DistInfo, cleanup_distributed, init_distributed, planned_world_size
from .knn import backbone_knn
from .metrics import MetricsLog
from .preemption import PreemptionFlag
from .run_lock import hold_run_folder
from .step import Trainer, amp_dtype

RESUME_KEYS = ("model", "momentum", "optimizer", "step", "loader", "rng")  # what _save writes and a resume reads


def pretrain(cfg: Config) -> dict[str, Any]:
    """Train; return {"step", "loss" (the last logged, mean over ranks), "run_dir", "preempted", "rank",
    "skipped_steps", "resumed_from"}."""
    check_config(cfg, planned_world_size())
    dist = init_distributed(cfg.dist.backend, cfg.dist.timeout_minutes)
    threads = torch.get_num_threads()
    try:
        with step_stream(dist.device, cfg.precision.priority_stream), hold_run_folder(Path(cfg.run.out), dist):
            return _train(cfg, dist)
    finally:
        torch.set_num_threads(threads)
        cleanup_distributed()


def _train(cfg: Config, dist: DistInfo) -> dict[str, Any]:
    run_dir = Path(cfg.run.out)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")

    if dist.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # The loader's worker processes need cores too: on 2 cores, 2 OpenMP threads racing
        # 2 decoding workers spin-wait (measured: demo preset 3.2 samples/s, 17 with 1 thread).
        torch.set_num_threads(max(1, usable_cpus() - cfg.data.workers))
    torch.manual_seed(cfg.data.seed)  # identical initial weights on every rank
    loader = build_loader(cfg.data.loader, cfg.data.path, cfg.data.recipe(), cfg.data.batch_size,
                          device=dist.device, dtype=amp_dtype(cfg.precision.amp, dist.device) or torch.float32,
                          seed=cfg.data.seed, rank=dist.rank, world_size=dist.world_size, workers=cfg.data.workers,
                          dali_tuning=cfg.data.dali_tuning)
    steps_per_epoch = len(loader)
    trainer = Trainer(cfg, dist, steps_per_epoch)
    torch.manual_seed(cfg.data.seed + dist.rank)

    step, resumed_from = 0, None
    found = _resume_state(cfg, run_dir)
    if found is not None:
        resumed_from, state = found
        trainer.load_state_dict(state)
        rank_state = _rank_state(state, dist)
        loader.load_state_dict(rank_state["loader"])
        _set_rng(rank_state["rng"])
        step = int(state["step"])
        if dist.is_main:
            sys.stderr.write(f"resuming from {resumed_from} (step {step})\n")

    flag_group = _flag_group(dist, cfg.dist.timeout_minutes)
    stop = min(cfg.schedule.steps or trainer.total_steps, trainer.total_steps)
    if dist.is_main:
        precision = str(trainer.amp).removeprefix("torch.") if trainer.amp is not None else "fp32"
        sys.stderr.write(
            f"{dist.world_size} process(es) x batch {cfg.data.batch_size} = global batch {trainer.global_batch}; "
            f"lr {trainer.peak_lr:g} ({cfg.optim.base_lr:g} x {trainer.global_batch} / 256); "
            f"{cfg.schedule.epochs} epochs x {steps_per_epoch} steps = {trainer.total_steps} "
            f"(warmup {trainer.warmup_steps}), this run to step {stop}; {cfg.model.arch}, "
            f"{cfg.data.loader} loader, {dist.device.type} {precision}; run folder {run_dir}\n")
    log = MetricsLog(run_dir, step, cfg.run.tensorboard) if dist.is_main else None
    bar = tqdm(total=stop, initial=step, unit="step", dynamic_ncols=True, disable=not (dist.is_main and cfg.run.progress))
    last_loss = None
    last_save_time, saved, saved_step = time.monotonic(), True, step
    window_start, window_steps, window_wait = time.perf_counter(), 0, 0.0
    every = cfg.monitor.knn_every_epochs

    def monitor_due(at: int) -> bool:
        return bool(every) and (at == stop or (at % steps_per_epoch == 0 and (at // steps_per_epoch) % every == 0))

    with PreemptionFlag() as preemption:
        preempted = False
        # A preemption at a monitored step saved that step and skipped the monitor: its record
        # would never be written, the run's final one included.
        if step and monitor_due(step) and _agree(dist, flag_group, dist.is_main and _knn_skipped(run_dir, step))[0]:
            _knn_monitor(cfg, trainer, dist, flag_group, log, step, steps_per_epoch)
        while step < stop and not preempted:
            loader.set_epoch(step // steps_per_epoch)
            batches = iter(loader)
            got_batch = False
            while step < stop:
                t0 = time.perf_counter()
                with trainer.timer("data_wait"), preemption.shield_children():
                    batch = next(batches, None)
                if batch is None:
                    break
                got_batch = True
                window_wait += time.perf_counter() - t0

                out = trainer.step(batch, step)
                step += 1
                window_steps += 1
                bar.update(1)

                if step % cfg.run.log_every_steps == 0 or step == stop:
                    now = time.perf_counter()
                    record = _record(out, step, steps_per_epoch, trainer, dist,
                                     window_steps / (now - window_start), window_wait / (now - window_start))
                    last_loss = record["loss"]
                    if log is not None:
                        log.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", samples_per_s=f"{record['samples_per_s']:.1f}")
                    window_start, window_steps, window_wait = now, 0, 0.0

                due = (step % cfg.run.checkpoint_every_steps == 0
                       or time.monotonic() - last_save_time >= 60 * cfg.run.checkpoint_every_minutes)
                preempted, due = _agree(dist, flag_group, preemption.requested, due)
                if due or preempted or step == stop:
                    saved = _save(run_dir, trainer, loader, step, steps_per_epoch, cfg, dist, flag_group)
                    last_save_time, saved_step = time.monotonic(), step
                if preempted:
                    break
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # leaves the loader's position at the last batch handed out
            if not got_batch and step < stop and not preempted:
                raise RuntimeError(f"the {cfg.data.loader} loader yielded no batch for epoch {step // steps_per_epoch}")
            if not preempted and monitor_due(step):
                if saved_step != step:  # a kill during the monitor (minutes) then loses no training
                    saved = _save(run_dir, trainer, loader, step, steps_per_epoch, cfg, dist, flag_group)
                    last_save_time, saved_step = time.monotonic(), step
                _knn_monitor(cfg, trainer, dist, flag_group, log, step, steps_per_epoch)
    bar.close()
    if log is not None:
        log.close()
    if not saved:  # the final or the preemption save: what trained since the newest checkpoint is lost
        newest = latest_checkpoint(run_dir)
        raise UsageError(f"the checkpoint at step {step} could not be written to {run_dir}; the newest on disk is "
                         f"{newest.name if newest else 'none'}: free space and rerun the same command to resume from it")
    if preempted and dist.is_main:
        sys.stderr.write(f"stopped at step {step} on a signal; checkpoint saved; rerun the same command to resume\n")
    return {"step": step, "loss": last_loss, "run_dir": str(run_dir), "preempted": preempted, "rank": dist.rank,
            "skipped_steps": trainer.skipped_steps, "resumed_from": str(resumed_from or "")}


def _resume_state(cfg: Config, run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    if cfg.run.resume == "none":
        return None
    found = load_latest(run_dir) if cfg.run.resume == "auto" else (Path(cfg.run.resume), load_checkpoint(cfg.run.resume))
    if found is not None:
        path, state = found
        missing = [k for k in RESUME_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise UsageError(f"{path} is not a pretraining checkpoint (it has no {', '.join(missing)}; an exported "
                             "backbone?): move it out of the run, or pass --resume none to start afresh")
    return found


def _rank_state(state: dict[str, Any], dist: DistInfo) -> dict[str, Any]:
    """This rank's loader and RNG state; rank 0's when the world size changed since the save."""
    ranks = state.get("ranks", [])
    if len(ranks) == dist.world_size:
        return ranks[dist.rank]
    return {"loader": state["loader"], "rng": state["rng"]}


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _flag_group(dist: DistInfo, timeout_minutes: float) -> Any:
    """The group that agrees on the per-step flags: a gloo (CPU) group beside NCCL, so that
    agreeing is a message between the hosts and never waits for the GPU's queued work (with
    an NCCL all_reduce the host would read the result back once a step, draining the GPU)."""
    if dist.is_distributed and torch_dist.get_backend() != "gloo":
        # Its own timeout: gloo groups otherwise wait 30 minutes whatever dist.timeout_minutes says.
        return torch_dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    return None


def _agree(dist: DistInfo, group: Any, *flags: bool) -> list[bool]:
    """Flags OR-ed over ranks, so every rank stops or saves at the same step."""
    if not dist.is_distributed:
        return list(flags)
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX, group=group)
    return [bool(v) for v in t.tolist()]


def _record(out: dict[str, Any], step: int, steps_per_epoch: int, trainer: Trainer, dist: DistInfo,
            steps_per_s: float, wait_fraction: float) -> dict[str, Any]:
    terms = torch.stack([out["loss"], out["align"], out["entropy"]]).float()
    if dist.is_distributed:
        torch_dist.all_reduce(terms)
        terms /= dist.world_size
    loss, align, entropy = terms.tolist()
    return {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": loss, "align": align, "entropy": entropy,
            "lr": out["lr"], "momentum": out["momentum"], "samples_per_s": steps_per_s * trainer.global_batch,
            "data_wait_fraction": wait_fraction, "skipped_steps": trainer.skipped_steps}


KNN_STARTED = ".knn_started"  # in the run folder: the step of the last monitor that began


def _knn_skipped(run_dir: Path, step: int) -> bool:
    """Whether the monitor at `step` never began (a preemption at that step). One that began and
    left no record was killed there, perhaps for its own sake (out of memory): retrying it would
    end every restart at the same step, so training goes on without it."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        with path.open() as f:
            if any('"knn_top1"' in line and json.loads(line)["step"] == step for line in f):
                return False
    try:
        began = int((run_dir / KNN_STARTED).read_text())
    except (OSError, ValueError):
        began = -1
    if began == step:
        sys.stderr.write(f"warning: the kNN monitor at step {step} began but never ended (the job was killed "
                         "during it); not retried, training goes on\n")
    return began != step


def _knn_monitor(cfg: Config, trainer: Trainer, dist: DistInfo, flag_group: Any, log: MetricsLog | None, step: int,
                 steps_per_epoch: int) -> None:
    """kNN accuracy of the online backbone, computed on rank 0 while the other ranks wait, logged
    as its own record. A monitored run trains as an unmonitored one: the monitor leaves the
    backbone's mode and statistics as it found them, and no loader of the run reads the global
    RNG (each draws from its seed, epoch and position), so the monitor's draws change nothing.

    SLURM signals every process of the job, so the monitor's loader workers must not see
    SIGTERM/SIGUSR2: the signals are held while it runs and handled at the next step boundary,
    which is why the monitor must stay well inside SLURM's signal lead (120 s)."""
    if dist.is_main:
        m = cfg.monitor
        epoch = round(step / steps_per_epoch, 4)
        with contextlib.suppress(UsageError):  # a full disk: this monitor may then be run twice
            write_atomic(Path(cfg.run.out) / KNN_STARTED, f"{step}\n")
        try:
            with PreemptionFlag.shield_children():
                result = backbone_knn(trainer.online.backbone, m.knn_train, m.knn_val, cfg.data.recipe().global_size,
                                      device=dist.device, workers=cfg.data.workers, progress=cfg.run.progress)
        except Exception as e:  # noqa: BLE001 - a monitor must never end hours of training
            tqdm.write(f"warning: kNN monitor at step {step} failed ({type(e).__name__}: {e}); training goes on",
                       file=sys.stderr)
        else:
            if log is not None:
                log.write({"step": step, "epoch": epoch, "knn_top1": result["top1"], "knn_top5": result["top5"]})
            tqdm.write(f"epoch {epoch:g} (step {step}): kNN top-1 {result['top1']:.2f}%, "
                       f"top-5 {result['top5']:.2f}% ({result['n_val']} val against {result['n_train']})",
                       file=sys.stderr)
    if dist.is_distributed:
        torch_dist.barrier(group=flag_group)


def _save(run_dir: Path, trainer: Trainer, loader: Any, step: int, steps_per_epoch: int, cfg: Config,
          dist: DistInfo, flag_group: Any) -> bool:
    """Save on rank 0; False if the write failed (a full disk or quota on a shared filesystem).

    A failed write is a warning, not the end of the run: save_checkpoint removed its partial
    file, the previous checkpoint is intact, the next due save tries again, and the other
    ranks learn of it (the all-reduce doubles as the barrier) so all of them report it at the end."""
    failed = False
    mine = {"loader": loader.state_dict(), "rng": _rng_state()}
    ranks = [mine]
    if dist.is_distributed:
        ranks = [None] * dist.world_size
        torch_dist.all_gather_object(ranks, mine)
    if dist.is_main:
        state = {**trainer.state_dict(), "step": step, "epoch": step // steps_per_epoch, "loader": mine["loader"],
                 "rng": mine["rng"], "ranks": ranks, "world_size": dist.world_size, "config": cfg.to_dict()}
        try:
            save_checkpoint(run_dir, state, step)
        except OSError as e:
            sys.stderr.write(f"warning: checkpoint at step {step} not written ({e.strerror or e}); "
                             "the previous one is kept and the next checkpoint tries again\n")
            failed = True
    return not _agree(dist, flag_group, failed)[0]
