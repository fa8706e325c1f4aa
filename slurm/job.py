"""The callables submitit runs on the cluster: pretraining (requeued on preemption), validate
and shards (requeued too; their scan resumes) and the DDP step benchmark.

Launching stays apart from training: `TrainJob` only turns the submitit task environment
into torch.distributed's and calls `train.pretrain.pretrain(cfg)`, which owns checkpoints,
resume and the stop-at-the-next-step signal handling.

Preemption and time limits, step by step:
1. SLURM sends SIGUSR2 (120 s before the time limit, `--signal`) or SIGTERM then SIGUSR2
   (preemption, `job._interrupt()`) to every task.
2. While training, the trainer's handler catches it; all ranks agree at the step boundary,
   save one atomic checkpoint and `pretrain` returns with `preempted=True`.
3. Global rank 0 then hands the signal to submitit's own handler (saved before training),
   which calls `TrainJob.checkpoint()` and runs `scontrol requeue`, unless SLURM is already
   ending the job (plain `scancel`: the checkpoint is kept, the job stays cancelled). A
   signal that arrives outside the training loop goes straight to that handler.
4. The requeued job runs `TrainJob` again with the same run folder; `pretrain` resumes
   from the newest checkpoint there. Progress lost is at most the last partial step.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any, Callable

import submitit


def rendezvous_from_submitit() -> dict[str, str]:
    """torch.distributed's env:// variables for this task, from submitit's job environment.

    submitit knows the task layout under SLURM and under its LocalExecutor alike, so the
    trainer sees the torchrun-style variables in both.
    """
    from train.distributed import rendezvous_env

    env = submitit.JobEnvironment()
    master = {"MASTER_ADDR": env.hostnames[0]}
    # The trainer's port rule, fed the job id of either executor (SLURM's, or the local controller's pid).
    master.update(rendezvous_env({**master, "SLURM_JOB_ID": env.job_id.split("_")[0]}))
    return {"RANK": str(env.global_rank), "WORLD_SIZE": str(env.num_tasks), "LOCAL_RANK": str(env.local_rank),
            **master}


def _slurm_keeps_running() -> bool:
    """Whether SLURM still counts this job as running, i.e. the stop came from a warning signal.

    `scancel`, a hard time limit or a preemption that SLURM requeues itself send SIGTERM and
    move the job to COMPLETING; the trainer stops the same way, but requeueing then would
    undo a user's cancel. Under submitit's LocalExecutor there is no SLURM job to ask.
    """
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id is None:
        return True
    state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
    return state.stdout.strip() == "RUNNING"


class TrainJob(submitit.helpers.Checkpointable):
    """`pretrain(cfg)` on every task; requeued with the same run folder when interrupted."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config  # Config.to_dict(): plain data, so the pickle survives code changes

    def __call__(self) -> dict[str, Any]:
        from train.config import Config
        from train.pretrain import pretrain

        os.environ.update(rendezvous_from_submitit())
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue handler
        result = pretrain(Config.from_dict(self.config))
        if result.get("preempted") and os.environ["RANK"] == "0" and callable(requeue) and _slurm_keeps_running():
            sys.stderr.write(f"checkpoint saved at step {result['step']}; requeueing\n")
            requeue(signal.SIGUSR2, None)  # calls self.checkpoint(), scontrol requeue, exits
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # Only rank 0 runs this, inside a signal handler: it cannot save a consistent state
        # across ranks, so it relies on the trainer's latest atomic checkpoint, which the
        # requeued job's `pretrain` resumes from (run.resume=auto, same run.out).
        run = {**self.config["run"], "resume": "auto"}
        return submitit.helpers.DelayedSubmission(TrainJob({**self.config, "run": run}))


class CpuJob(submitit.helpers.Checkpointable):
    """`mveb validate` or `mveb shards` as a job that a time limit requeues as a preemption
    does (submitit ends a plain function's job at its time limit). The rerun's scan resumes
    from its journal (pipeline/validate.py), so the decoding done before the signal is kept;
    a shard's write starts over."""

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def __call__(self) -> Any:
        return self.fn(*self.args, **self.kwargs)


def shard_job(src: str, out: str, **options: Any) -> dict[str, Any]:
    """`mveb shards` as a CPU job: one task, its CPUs as writer processes."""
    from pipeline.shards import build_shard

    return build_shard(src, out, **options)


def validate_job(src: str, report: str | None, fix_list: str | None, workers: int) -> dict[str, Any]:
    """`mveb validate` as a CPU job: one task, its CPUs as decoding processes."""
    from pipeline.validate import validate

    result = validate(src, report, fix_list, workers)
    return {"decodable": len(result.good), "broken": len(result.bad), "seconds": result.seconds,
            "resumed": result.resumed}


def bench_job(json_path: str, **options: Any) -> dict[str, Any] | None:
    """`mveb bench step` under DDP on every task; rank 0 writes the report and returns it."""
    import json

    from mveb.bench_ddp import bench_step_ddp
    from mveb.files import write_atomic

    os.environ.update(rendezvous_from_submitit())
    report = bench_step_ddp("auto", **options)
    if report is not None:
        write_atomic(json_path, json.dumps(report, indent=2))
    return report
