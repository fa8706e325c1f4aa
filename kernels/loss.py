"""The MVEB loss for all V views at once, with a closed-form gradient.

Per view (DESIGN.md, "MVEB math"), with M = (K + eta I)^{-1} diag(K 1) / tau:
    score = -M Z = -Y,   entropy = -mean_b <score_b, z_b> = sum_b <y_b, z_b> / B,
and the gradient is elementwise given Y:
    d loss / d z_v = -(target_v + lam y_v) / (V B).
The row dots <z, d loss / d z> that the normalization's backward needs are also known from
the forward (the align row dots and <y_b, z_b>). So the forward computes the gradient for a
unit upstream gradient in one more elementwise pass, and the backward is one multiply: on a
GPU the whole loss is then one CUDA graph replay and one host sync (kernels/triton_ops.py).

With a process group, the score comes from the unit rows of every process in it (no
gradient) and each process keeps the rows of its own samples: the formulas above stay those
of the local rows (B is the local batch), only M is built from the global batch. Each view's
global system is solved once, by the rank that owns it, not by every rank (gathered_score).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from kernels.torch_ops import TorchOps

_TORCH = TorchOps()


def failed_views(info: torch.Tensor) -> list[int]:
    """The views whose fp32 inversion failed (info != 0). Reading info is the one
    device-to-host sync of the loss."""
    return [v for v, code in enumerate(info.tolist()) if code]


def redo_failed_fp64(
    z: torch.Tensor, y: torch.Tensor, ms: torch.Tensor, tau: torch.Tensor, failed: list[int], eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, ms) with the `failed` views (from failed_views, when it found any) redone in fp64 from z,
    as new tensors: the inputs may be a CUDA graph's buffers, kept for its next replay."""
    y, ms = y.clone(), ms.clone()
    y[failed], ms[failed] = (x.to(y.dtype) for x in _retry_fp64(z[failed], tau[failed], eta))
    return y, ms


def _retry_fp64(z: torch.Tensor, tau: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y = M z, row sums of M * S) of the views whose fp32 inversion failed, from a fp64
    Gram matrix (exp of a true Gram matrix is positive definite; a rounded fp32 one may not
    be). NaN where even fp64 fails."""
    z = z.double()
    tau = tau.double()
    a, r = _TORCH.exp_kernel(torch.bmm(z, z.transpose(1, 2)), tau, eta)
    factor, info = torch.linalg.cholesky_ex(a)
    y = torch.cholesky_solve(z * (r / tau[:, None])[..., None], factor).masked_fill((info != 0)[:, None, None], math.nan)
    return y, (y * z).sum(dim=-1)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64 (tests compare to the literal form at 1e-10); everything else runs in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def owned_views(views: int, world: int, rank: int) -> int:
    """How many views rank owns: view v is solved by rank v % world (none when rank >= views)."""
    return len(range(rank, views, world))


@functools.lru_cache(maxsize=64)
def owner_order(views: int, world: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, inverse) [V]: the views grouped by owner rank (rank 0's first, each owner's in
    view order), which is the layout of all_to_all_single's rank-ordered chunks, and the
    permutation that puts them back in view order. Cached: building it is a host-to-device copy."""
    order = torch.tensor([v for rank in range(world) for v in range(rank, views, world)])
    return order.to(device), order.argsort().to(device)


def gathered_score(
    z: torch.Tensor, eta: float, min_tau: float, ops: TorchOps, group: dist.ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, ms, tau) for this process's unit rows z [V, B, D], with M built from the rows of
    every process in group (all the same shape, concatenated in group rank order).

    The views are sharded over the ranks: rank v % W solves view v's (W B) x (W B) system, so
    the W ranks do the V solves once between them instead of each doing all V. Two
    all_to_alls: every rank sends each view's B rows to its owner, and each owner sends back to
    every rank that rank's B rows of y and ms, with tau (a rank sends V B D and gets
    V B (D + 2) back; an owner also receives and returns W B D per owned view, where an
    all_gather had every rank receive W V B D). Only copies move the rows, so the result is
    that of solving the concatenated batch of all V views on every rank, to the last bit
    wherever a view's solve does not depend on which other views share its batch (the CPU
    ops; a CUDA batched GEMM or Cholesky may pick another kernel for another batch count, a
    float-rounding difference). The fp64-retry check (a host sync) runs on the owners only."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    views, b, d = z.shape
    counts = [owned_views(views, world, r) for r in range(world)]
    mine = counts[rank]
    order, inverse = owner_order(views, world, z.device)
    # Chunk r of the input is this rank's rows of the views rank r owns; chunk r of the output
    # is rank r's rows of the views this rank owns: [W, mine, B, D], empty on a rank owning none.
    received = z.new_empty(world * mine, b, d)
    dist.all_to_all_single(received, z.index_select(0, order), [mine] * world, counts, group=group)
    # y, ms and tau in one buffer, so that the way back is one collective: packed[r] is rank
    # r's rows of y for each owned view, with ms and tau as two more columns.
    packed = z.new_empty(world, mine, b, d + 2)
    if mine:
        z_own = received.unflatten(0, (world, mine)).transpose(0, 1).reshape(mine, world * b, d)
        y, ms, tau, info = ops.score(z_own, eta, min_tau)
        failed = failed_views(info)
        if failed:
            y, ms = redo_failed_fp64(z_own, y, ms, tau, failed, eta)
        packed[..., :d] = y.unflatten(1, (world, b)).transpose(0, 1)
        packed[..., d] = ms.unflatten(1, (world, b)).transpose(0, 1)
        packed[..., d + 1] = tau[:, None]
    back = z.new_empty(views, b, d + 2)
    dist.all_to_all_single(back, packed.flatten(0, 1), counts, [mine] * world, group=group)
    # back holds the views in owner order; separate tensors in view order, so that the [V]
    # tau handed to the caller does not keep the [V, B, D + 2] buffer alive.
    return (back[..., :d].index_select(0, inverse), back[..., d].index_select(0, inverse),
            back[:, 0, d + 1].index_select(0, inverse))


class MvebLossFunction(torch.autograd.Function):
    """(loss, align, mean entropy, tau) from online [V, B, D] and targets [2, B, D];
    group: None, or the process group whose gathered rows the score is computed from."""

    @staticmethod
    def forward(ctx, online, targets, lam, eta, min_tau, ops, group=None):  # type: ignore[override]
        with torch.autocast(online.device.type, enabled=False):
            dtype = compute_dtype(online)
            if group is None:
                loss, align, entropy_mean, tau, grad, info, *state = ops.forward_all(online, targets, dtype, eta,
                                                                                     min_tau, lam)
                failed = failed_views(info)
                if failed:  # rare: the retry reads `state` before any other loss call can reuse it
                    z, norms, t, rowdot, y, ms = state
                    y, ms = redo_failed_fp64(z, y, ms, tau, failed, eta)
                    loss, align, entropy_mean, grad = ops.loss_and_grad(z, norms, t, rowdot, y, ms, lam)
            else:
                # The same steps as forward_all with the collectives between them (so never
                # inside the Triton op set's CUDA graph).
                z, norms, t, rowdot = ops.normalize_align(online, targets, dtype)
                y, ms, tau = gathered_score(z, eta, min_tau, ops, group)
                loss, align, entropy_mean, grad = ops.loss_and_grad(z, norms, t, rowdot, y, ms, lam)
        ctx.save_for_backward(grad)
        ctx.in_dtype = online.dtype
        ctx.mark_non_differentiable(align, entropy_mean, tau)
        return loss, align, entropy_mean, tau

    @staticmethod
    @once_differentiable  # create_graph=True works; differentiating the gradient again raises
    def backward(ctx, grad_loss, _align, _entropy, _tau):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        # The loss is linear in its upstream gradient's scale: one multiply, cast on the way out.
        out = torch.empty(grad.shape, dtype=ctx.in_dtype, device=grad.device)
        torch.mul(grad, grad_loss.to(grad.dtype), out=out)
        return out, None, None, None, None, None, None


def entropy_score_batched(x: torch.Tensor, eta: float, min_tau: float, ops: TorchOps) -> torch.Tensor:
    """-M X for unit rows x [V, B, D], computed in fp32 (fp64 for fp64 input)."""
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        z = x.to(compute_dtype(x))
        y, ms, tau, info = ops.score(z, eta, min_tau)
        failed = failed_views(info)
        if failed:
            y, _ = redo_failed_fp64(z, y, ms, tau, failed, eta)
        return -y
