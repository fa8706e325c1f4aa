"""torch.distributed from the torchrun or SLURM environment; a single process otherwise.

One task per GPU: the rank, world size and local rank come from torchrun (RANK, WORLD_SIZE,
LOCAL_RANK) or from SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, as srun and submitit
set them). No process is launched here.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mveb.errors import UsageError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_distributed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_ranks(env: dict[str, str]) -> tuple[int, int, int] | None:
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0"))
    return None


def _first_slurm_host(nodelist: str) -> str:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
    hosts = out.stdout.split()
    if out.returncode != 0 or not hosts:
        raise UsageError(f"cannot expand SLURM_JOB_NODELIST={nodelist!r} with scontrol; set MASTER_ADDR")
    return hosts[0]


def rendezvous_env(env: dict[str, str]) -> dict[str, str]:
    """MASTER_ADDR / MASTER_PORT for a SLURM job that did not set them (srun without torchrun)."""
    out = {}
    if "MASTER_ADDR" not in env:
        if "SLURM_JOB_NODELIST" not in env:
            raise UsageError("distributed run without MASTER_ADDR or SLURM_JOB_NODELIST; set MASTER_ADDR")
        out["MASTER_ADDR"] = _first_slurm_host(env["SLURM_JOB_NODELIST"])
    if "MASTER_PORT" not in env:
        # Same port on every task of a job, different across jobs sharing a node.
        out["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return out


def init_distributed(backend: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    env = dict(os.environ)
    ranks = _env_ranks(env)
    cuda = torch.cuda.is_available()
    if ranks is None or ranks[1] == 1:
        local = ranks[2] if ranks else 0
        device = torch.device("cuda", local % torch.cuda.device_count()) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        return DistInfo(0, 1, local, device, False)
    rank, world, local = ranks
    os.environ.update(rendezvous_env(env))
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local))
    if cuda:
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if backend == "nccl" else None)
    return DistInfo(rank, world, local, device, True)


def ranks_by_host(hosts: list[str]) -> list[list[int]]:
    """The ranks of each host, hosts in order of their first rank: ["a", "b", "a"] -> [[0, 2], [1]]."""
    groups: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        groups.setdefault(host, []).append(rank)
    return list(groups.values())


def node_group() -> dist.ProcessGroup:
    """The process group of this rank's host (every rank must call it: each group is created
    on all ranks). Hosts are told apart by name, so it holds for torchrun and SLURM alike."""
    hosts: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    group, _ = dist.new_subgroups_by_enumeration(ranks_by_host(hosts))
    return group


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def planned_world_size() -> int:
    """The world size the environment asks for, known before any rendezvous."""
    ranks = _env_ranks(dict(os.environ))
    return ranks[1] if ranks else 1
