"""mveb_loss(gather_group=...): the entropy over the batch gathered from all processes, with
real torch.distributed (gloo on CPU, one spawned process per rank) against one process that
holds the whole batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kernels import mveb_loss
from test_kernels_math import make_views, rel

VIEWS, B, D = 4, 5, 16  # B per rank


def _global_inputs(world: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch (W B samples), the same in every process: rank r holds samples r B .. (r + 1) B."""
    online, targets = make_views("clustered", VIEWS, world * B, D, seed=world, dtype=dtype)
    return online.detach(), targets


def _loss_and_grad(online: torch.Tensor, targets: torch.Tensor, impl: str,
                   group: dist.ProcessGroup | None) -> dict[str, torch.Tensor]:
    online = online.clone().requires_grad_()
    loss, parts = mveb_loss(online, targets, impl=impl, return_parts=True, gather_group=group)
    (grad,) = torch.autograd.grad(loss, online)
    return {"loss": loss.detach(), "grad": grad, "tau": parts["tau"]}


def _worker(rank: int, world: int, init_method: str, impl: str, dtype: torch.dtype, out: str) -> None:
    """One rank: its loss and gradient with the world group, with None and with a 1-process group."""
    torch.set_num_threads(1)  # W processes on 2 cores
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        online, targets = _global_inputs(world, dtype)
        rows = slice(rank * B, (rank + 1) * B)
        # new_group is collective: every rank creates every 1-process group and keeps its own.
        alone = [dist.new_group([r]) for r in range(world)][rank]
        groups = {"gathered": dist.group.WORLD, "local": None, "alone": alone}
        results = {name: _loss_and_grad(online[:, rows], targets[:, rows], impl, g) for name, g in groups.items()}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run(world: int, impl: str, dtype: torch.dtype, folder: Path) -> list[dict]:
    mp.spawn(_worker, args=(world, f"file://{folder / 'rendezvous'}", impl, dtype, str(folder)), nprocs=world)
    return [torch.load(folder / f"rank{r}.pt") for r in range(world)]


def _single_process(world: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The whole batch in one process, fp64 torch: what the gathered ranks must add up to."""
    online, targets = _global_inputs(world, dtype)
    return _loss_and_grad(online.double(), targets.double(), "torch", None)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"W{w}")
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, list[dict], dict]:
    world = request.param
    got = _run(world, "torch", torch.float64, tmp_path_factory.mktemp(f"gloo{world}"))
    return world, got, _single_process(world, torch.float64)


@pytest.mark.timeout(120)
def test_mean_of_rank_losses_is_the_global_batch_loss(ranks: tuple) -> None:
    world, got, want = ranks
    mean = sum(r["gathered"]["loss"] for r in got) / world
    assert mean.dtype == torch.float64
    assert abs(mean.item() - want["loss"].item()) <= 1e-10 * abs(want["loss"].item())
    for r in got:  # every rank solves the same global system
        assert torch.allclose(r["gathered"]["tau"], want["tau"], rtol=1e-12, atol=0)


@pytest.mark.timeout(120)
def test_rank_gradient_over_w_is_the_global_batch_gradient(ranks: tuple) -> None:
    """DDP averages over W ranks: grad_r / W must be the single-process gradient of rank r's rows."""
    world, got, want = ranks
    for rank, r in enumerate(got):
        assert rel(r["gathered"]["grad"] / world, want["grad"][:, rank * B:(rank + 1) * B]) <= 1e-10


@pytest.mark.timeout(120)
def test_local_entropy_differs_from_gathered(ranks: tuple) -> None:
    """gather_group=None is the per-process loss: if gathering were skipped, the tests above would fail."""
    world, got, want = ranks
    for r in got:
        local, gathered = r["local"], r["gathered"]
        assert abs(local["loss"].item() - gathered["loss"].item()) > 1e-6 * abs(gathered["loss"].item())
        assert rel(local["grad"], gathered["grad"]) > 1e-6
    mean_local = sum(r["local"]["loss"] for r in got) / world
    assert abs(mean_local.item() - want["loss"].item()) > 1e-6 * abs(want["loss"].item())


@pytest.mark.timeout(120)
def test_one_process_group_equals_none(ranks: tuple) -> None:
    _, got, _ = ranks
    for r in got:
        assert torch.equal(r["alone"]["loss"], r["local"]["loss"])
        assert torch.equal(r["alone"]["grad"], r["local"]["grad"])
        assert torch.equal(r["alone"]["tau"], r["local"]["tau"])


@pytest.mark.parametrize("impl", ["reference", "reference-literal"])
def test_reference_impls_refuse_a_gather_group(impl: str) -> None:
    online, targets = make_views("random", 2, 4, 3, seed=1)
    group = dist.ProcessGroup(dist.HashStore(), 0, 1)  # a group object, no global init needed
    with pytest.raises(ValueError, match="gather_group is not supported by impl"):
        mveb_loss(online, targets, impl=impl, gather_group=group)


def test_gather_group_must_be_a_process_group() -> None:
    online, targets = make_views("random", 2, 4, 3, seed=1)
    with pytest.raises(ValueError, match="must be a torch.distributed ProcessGroup or None"):
        mveb_loss(online, targets, impl="torch", gather_group=True)


@pytest.mark.timeout(300)
def test_triton_interpreted_gathered_matches_global_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 through the Triton kernels (TRITON_INTERPRET=1, inherited by the spawned ranks,
    which import triton only when the loss asks for it), to the fp32 bounds of
    tests/test_kernels_triton.py."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    world = 2
    got = _run(world, "triton", torch.float32, tmp_path)
    want = _single_process(world, torch.float32)
    mean = sum(r["gathered"]["loss"] for r in got) / world
    assert mean.dtype == torch.float32
    assert abs(mean.item() - want["loss"].item()) <= 1e-5 * max(1.0, abs(want["loss"].item()))
    for rank, r in enumerate(got):
        assert rel(r["gathered"]["grad"] / world, want["grad"][:, rank * B:(rank + 1) * B]) <= 1e-4
        assert torch.equal(r["alone"]["loss"], r["local"]["loss"])
        assert torch.equal(r["alone"]["grad"], r["local"]["grad"])
