"""mveb_loss(gather_group=...): the entropy over the batch gathered from all processes, with
real torch.distributed (gloo on CPU, one spawned process per rank) against one process that
holds the whole batch. The views are sharded over the ranks (view v solved by rank v % W), so
the cases cover W dividing V, an uneven share and W > V (a rank that owns no view)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kernels import mveb_loss
from kernels.loss import gathered_score
from kernels.torch_ops import TorchOps
from test_kernels_math import make_views, rel

VIEWS, B, D = 4, 5, 16  # B per rank
ETA, MIN_TAU = 0.01, 0.1


def _global_inputs(world: int, views: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch (W B samples), the same in every process: rank r holds samples r B .. (r + 1) B."""
    online, targets = make_views("clustered", views, world * B, D, seed=10 * world + views, dtype=dtype)
    return online.detach(), targets


def _loss_and_grad(online: torch.Tensor, targets: torch.Tensor, impl: str,
                   group: dist.ProcessGroup | None) -> dict[str, torch.Tensor]:
    online = online.clone().requires_grad_()
    loss, parts = mveb_loss(online, targets, impl=impl, return_parts=True, gather_group=group)
    (grad,) = torch.autograd.grad(loss, online)
    return {"loss": loss.detach(), "grad": grad, "tau": parts["tau"]}


class _CountingOps(TorchOps):
    """TorchOps that records the shape of every batch of views it solves."""

    def __init__(self) -> None:
        super().__init__()
        self.solved: list[tuple[int, ...]] = []

    def score(self, z: torch.Tensor, eta: float, min_tau: float) -> tuple[torch.Tensor, ...]:
        self.solved.append(tuple(z.shape))
        return super().score(z, eta, min_tau)


def _all_gather_score(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """What gathered_score returned before the views were sharded, as the oracle: every rank
    all_gathers every view's rows and solves all V systems, then keeps its own rows."""
    world, rank = dist.get_world_size(), dist.get_rank()
    parts = [torch.empty_like(z) for _ in range(world)]
    dist.all_gather(parts, z)
    y, ms, tau, info = TorchOps().score(torch.cat(parts, dim=1), ETA, MIN_TAU)
    assert not info.any()
    rows = slice(rank * B, (rank + 1) * B)
    return {"y": y[:, rows], "ms": ms[:, rows], "tau": tau}


def _sharded_score(z: torch.Tensor) -> dict[str, torch.Tensor | list]:
    ops = _CountingOps()
    y, ms, tau = gathered_score(z, ETA, MIN_TAU, ops, dist.group.WORLD)
    return {"y": y, "ms": ms, "tau": tau, "solved": ops.solved}


def _worker(rank: int, world: int, views: int, init_method: str, impl: str, dtype: torch.dtype, out: str) -> None:
    """One rank: its loss and gradient with the world group, with None and with a 1-process
    group; for the torch impl also the score with its solves recorded, and the all-gather oracle's."""
    torch.set_num_threads(1)  # W processes on 2 cores
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        online, targets = _global_inputs(world, views, dtype)
        rows = slice(rank * B, (rank + 1) * B)
        # new_group is collective: every rank creates every 1-process group and keeps its own.
        alone = [dist.new_group([r]) for r in range(world)][rank]
        groups = {"gathered": dist.group.WORLD, "local": None, "alone": alone}
        results = {name: _loss_and_grad(online[:, rows], targets[:, rows], impl, g) for name, g in groups.items()}
        if impl == "torch":
            z = online[:, rows] / online[:, rows].norm(dim=-1, keepdim=True)
            results["sharded"], results["all_gather"] = _sharded_score(z), _all_gather_score(z)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run(world: int, views: int, impl: str, dtype: torch.dtype, folder: Path) -> list[dict]:
    mp.spawn(_worker, args=(world, views, f"file://{folder / 'rendezvous'}", impl, dtype, str(folder)),
             nprocs=world)
    return [torch.load(folder / f"rank{r}.pt") for r in range(world)]


def _single_process(world: int, views: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The whole batch in one process, fp64 torch: what the gathered ranks must add up to."""
    online, targets = _global_inputs(world, views, dtype)
    return _loss_and_grad(online.double(), targets.double(), "torch", None)


# (W, V) = (2, 4): each rank owns 2 views; (3, 4): rank 0 owns views 0 and 3, ranks 1 and 2
# one each; (3, 2): rank 2 owns none.
@pytest.fixture(scope="module", params=[(2, 4), (3, 4), (3, 2)], ids=lambda p: f"W{p[0]}V{p[1]}")
def ranks(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> tuple[int, int, list[dict], dict]:
    world, views = request.param
    got = _run(world, views, "torch", torch.float64, tmp_path_factory.mktemp(f"gloo{world}v{views}"))
    return world, views, got, _single_process(world, views, torch.float64)


@pytest.mark.timeout(120)
def test_mean_of_rank_losses_is_the_global_batch_loss(ranks: tuple) -> None:
    world, _, got, want = ranks
    mean = sum(r["gathered"]["loss"] for r in got) / world
    assert mean.dtype == torch.float64
    assert abs(mean.item() - want["loss"].item()) <= 1e-10 * abs(want["loss"].item())
    for r in got:  # each view's tau is computed once, by its owner, and sent to every rank
        assert torch.allclose(r["gathered"]["tau"], want["tau"], rtol=1e-12, atol=0)
        assert torch.equal(r["gathered"]["tau"], got[0]["gathered"]["tau"])


@pytest.mark.timeout(120)
def test_rank_gradient_over_w_is_the_global_batch_gradient(ranks: tuple) -> None:
    """DDP averages over W ranks: grad_r / W must be the single-process gradient of rank r's rows."""
    world, _, got, want = ranks
    for rank, r in enumerate(got):
        assert rel(r["gathered"]["grad"] / world, want["grad"][:, rank * B:(rank + 1) * B]) <= 1e-10


@pytest.mark.timeout(120)
def test_local_entropy_differs_from_gathered(ranks: tuple) -> None:
    """gather_group=None is the per-process loss: if gathering were skipped, the tests above would fail."""
    world, _, got, want = ranks
    for r in got:
        local, gathered = r["local"], r["gathered"]
        assert abs(local["loss"].item() - gathered["loss"].item()) > 1e-6 * abs(gathered["loss"].item())
        assert rel(local["grad"], gathered["grad"]) > 1e-6
    mean_local = sum(r["local"]["loss"] for r in got) / world
    assert abs(mean_local.item() - want["loss"].item()) > 1e-6 * abs(want["loss"].item())


@pytest.mark.timeout(120)
def test_one_process_group_equals_none(ranks: tuple) -> None:
    _, _, got, _ = ranks
    for r in got:
        assert torch.equal(r["alone"]["loss"], r["local"]["loss"])
        assert torch.equal(r["alone"]["grad"], r["local"]["grad"])
        assert torch.equal(r["alone"]["tau"], r["local"]["tau"])


@pytest.mark.timeout(120)
def test_each_view_is_solved_once_by_its_owner(ranks: tuple) -> None:
    """Rank r solves the views v % W == r, each over all W B rows, and nothing else."""
    world, views, got, _ = ranks
    for rank, r in enumerate(got):
        owned = len(range(rank, views, world))
        assert r["sharded"]["solved"] == ([(owned, world * B, D)] if owned else [])


@pytest.mark.timeout(120)
def test_sharded_score_is_the_all_gather_score(ranks: tuple) -> None:
    """The rows travel by copies only: y, ms and tau equal the all-gather version's to fp64
    rounding. Not bit for bit: a batched solve may round a view differently by how many views
    share its batch (seen on an AMD EPYC, not on the earlier Intel machines)."""
    _, _, got, _ = ranks
    for r in got:
        for key in ("y", "ms", "tau"):
            torch.testing.assert_close(r["sharded"][key], r["all_gather"][key], rtol=1e-12, atol=1e-12, msg=key)


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
    got = _run(world, VIEWS, "triton", torch.float32, tmp_path)
    want = _single_process(world, VIEWS, torch.float32)
    mean = sum(r["gathered"]["loss"] for r in got) / world
    assert mean.dtype == torch.float32
    assert abs(mean.item() - want["loss"].item()) <= 1e-5 * max(1.0, abs(want["loss"].item()))
    for rank, r in enumerate(got):
        assert rel(r["gathered"]["grad"] / world, want["grad"][:, rank * B:(rank + 1) * B]) <= 1e-4
        assert torch.equal(r["alone"]["loss"], r["local"]["loss"])
        assert torch.equal(r["alone"]["grad"], r["local"]["grad"])
