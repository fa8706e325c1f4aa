"""What a launch asks of SLURM: tasks, world size, batch split, learning rate, sbatch parameters.

Pure arithmetic, no submission, so `--dry-run` and the real submission print and submit the
same numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mveb.errors import UsageError

# Seconds between SLURM's warning signal and the kill at the time limit: enough for the
# trainer to finish its step and write a checkpoint of a ResNet-50 with optimizer state.
SIGNAL_DELAY_S = 120
# A shorter limit gets that signal at SLURM's first check instead, and again after each requeue
# (measured on the local cluster: 22-30 s into each start of a 2-minute job), so a start slower than
# that never reaches a step and is requeued up to MAX_TIMEOUT_REQUEUES times. Five minutes leave
# three for start-up and training.
MIN_TIME_MIN = SIGNAL_DELAY_S // 60 + 3


@dataclass(frozen=True)
class Resources:
    """The SLURM-side request, the same for training and for CPU jobs such as shards."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int = 1
    time_min: int = 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    mem: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    name: str = "mveb"

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def sbatch_parameters(self) -> dict[str, object]:
        """submitit SlurmExecutor parameters (sbatch option names with underscores)."""
        params: dict[str, object] = {
            "job_name": self.name, "nodes": self.nodes, "ntasks_per_node": self.tasks_per_node,
            "cpus_per_task": self.cpus_per_task, "time": self.time_min,
            "signal_delay_s": SIGNAL_DELAY_S,
            # Requeue on node failure or preemption too, not only via submitit's own handler.
            "additional_parameters": {"requeue": True},
            # One thread pool per task sized to its CPUs: no oversubscription across ranks.
            "setup": [f"export OMP_NUM_THREADS={self.cpus_per_task}"],
        }
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        optional = {"partition": self.partition, "account": self.account, "qos": self.qos, "mem": self.mem,
                    "constraint": self.constraint, "exclude": self.exclude}
        params.update({k: v for k, v in optional.items() if v is not None})
        return params

    def local_parameters(self) -> dict[str, object]:
        """submitit LocalExecutor parameters: one node, the same tasks per node."""
        return {"tasks_per_node": self.tasks_per_node, "gpus_per_node": self.gpus_per_node,
                "timeout_min": self.time_min}


def resources(nodes: int, gpus_per_node: int, tasks_per_node: int | None, **rest: object) -> Resources:
    """One task per GPU; on CPU nodes (`gpus_per_node=0`) `tasks_per_node` processes, default 1."""
    if nodes < 1:
        raise UsageError(f"--nodes must be at least 1, got {nodes}")
    if gpus_per_node < 0:
        raise UsageError(f"--gpus-per-node must be 0 (CPU tasks) or more, got {gpus_per_node}")
    if gpus_per_node and tasks_per_node not in (None, gpus_per_node):
        raise UsageError(f"--tasks-per-node {tasks_per_node} with --gpus-per-node {gpus_per_node}: one task runs "
                         "per GPU; drop --tasks-per-node or pass --gpus-per-node 0 for CPU tasks")
    tasks = gpus_per_node or (tasks_per_node if tasks_per_node is not None else 1)
    if tasks < 1:
        raise UsageError(f"--tasks-per-node must be at least 1, got {tasks}")
    time_min = rest.get("time_min")
    if isinstance(time_min, int) and time_min < MIN_TIME_MIN:
        raise UsageError(f"--time of {time_min} min is too short: SLURM's warning signal comes {SIGNAL_DELAY_S} s "
                         f"before the limit, so the job would be requeued before it did any work; ask for at least "
                         f"{MIN_TIME_MIN} minutes")
    cpus = rest.get("cpus_per_task")
    if isinstance(cpus, int) and cpus < 1:
        raise UsageError(f"--cpus-per-task must be at least 1, got {cpus}")
    return Resources(nodes=nodes, gpus_per_node=gpus_per_node, tasks_per_node=tasks, **rest)  # type: ignore[arg-type]


@dataclass(frozen=True)
class BatchPlan:
    per_rank: int
    world_size: int
    base_lr: float
    lr: float

    @property
    def global_batch(self) -> int:
        return self.per_rank * self.world_size


def batch_plan(world_size: int, base_lr: float, global_batch: int | None, per_rank: int | None,
               preset_per_rank: int) -> BatchPlan:
    """Split a global batch over the ranks (or scale a per-GPU one up) and scale the LR with it."""
    from train.schedules import scaled_lr

    if global_batch is not None:
        if global_batch < 1:
            raise UsageError(f"--batch-size must be at least 1, got {global_batch}")
        if global_batch % world_size:
            raise UsageError(f"--batch-size {global_batch} is not divisible by the world size {world_size}; "
                             f"use a multiple of {world_size} or --batch-per-gpu")
        per_rank = global_batch // world_size
    per_rank = per_rank if per_rank is not None else preset_per_rank
    if per_rank < 2:
        raise UsageError(f"batch per task is {per_rank}; MVEB's entropy term needs at least 2 samples per task")
    return BatchPlan(per_rank, world_size, base_lr, scaled_lr(base_lr, per_rank * world_size))


_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_time(text: str) -> int:
    """sbatch --time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) to whole minutes."""
    m = _TIME.match(text.strip())
    if m is None:
        raise UsageError(f"--time {text!r}: use HH:MM:SS, D-HH:MM:SS or minutes")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = ((days * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = (a * 60 + b) * 60 + c
    elif b is not None:  # MM:SS
        seconds = a * 60 + b
    else:  # MM
        seconds = a * 60
    minutes = -(-seconds // 60)
    if minutes < 1:
        raise UsageError(f"--time {text!r} is shorter than a minute")
    return minutes
