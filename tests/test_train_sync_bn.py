"""model.sync_bn_group=node: BatchNorm statistics shared by one host's ranks only. SyncBatchNorm
itself needs CUDA; the grouping, its collective set-up (gloo, one spawned process per rank)
and the conversion of the model's BatchNorm layers run here."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from train.distributed import node_group, ranks_by_host
from train.model import Encoder, momentum_copy


def test_ranks_by_host_keeps_rank_order_within_and_across_hosts() -> None:
    assert ranks_by_host(["a", "b", "a", "b", "c"]) == [[0, 2], [1, 3], [4]]
    assert ranks_by_host(["n1"] * 4) == [[0, 1, 2, 3]]


def _worker(rank: int, world: int, init_method: str, hosts: list[str], out: str) -> None:
    torch.set_num_threads(1)
    socket.gethostname = lambda: hosts[rank]  # this process only: stands in for W hosts
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        group = node_group()
        peers = [None] * dist.get_world_size(group)
        dist.all_gather_object(peers, rank, group=group)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(Encoder("resnet18", 32, 16), process_group=group)
        # The momentum encoder is a copy of the converted model: its layers share the same group.
        bns = [m for enc in (model, momentum_copy(model)) for m in enc.modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        torch.save({"peers": peers, "sync": all(isinstance(m, torch.nn.SyncBatchNorm) for m in bns),
                    "grouped": all(m.process_group is group for m in bns), "bns": len(bns)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("hosts,groups", [(["a", "b", "a"], [[0, 2], [1], [0, 2]]), (["a", "a"], [[0, 1], [0, 1]])])
def test_node_group_holds_the_ranks_of_one_host(hosts: list[str], groups: list[list[int]], tmp_path: Path) -> None:
    out = str(tmp_path / "rank")
    mp.spawn(_worker, args=(len(hosts), f"file://{tmp_path / 'rendezvous'}", hosts, out), nprocs=len(hosts))
    results = [torch.load(f"{out}.{r}") for r in range(len(hosts))]
    assert [r["peers"] for r in results] == groups
    # Every BatchNorm of the backbone and projector, online and momentum, is a SyncBatchNorm over that group.
    assert all(r["sync"] and r["grouped"] and r["bns"] == 2 * (20 + 2) for r in results)
