"""The MVEB loss for all V views at once, with a closed-form gradient.

Per view (DESIGN.md, "MVEB math"), with M = (K + eta I)^{-1} diag(K 1) / tau:
    score = -M Z = -Y,   entropy = -mean_b <score_b, z_b> = sum_b <y_b, z_b> / B,
and the gradient is elementwise given Y:
    d loss / d z_v = -(target_v + lam y_v) / (V B).
The row dots <z, d loss / d z> that the normalization's backward needs are also known from
the forward (the align row dots and <y_b, z_b>). So the forward computes the gradient for a
unit upstream gradient in one more elementwise pass, and the backward is one multiply: on a
GPU the whole loss is then one CUDA graph replay and one host sync (kernels/triton_ops.py).

With a process group, the score comes from the unit rows of every process in it (gathered,
no gradient) and each process keeps the rows of its own samples: the formulas above stay
those of the local rows (B is the local batch), only M is built from the global batch.
"""

from __future__ import annotations

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
    """(y, ms) with the `failed` views redone in fp64 from z (new tensors; the inputs are kept)."""
    y, ms = y.clone(), ms.clone()
    if failed:
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


def gathered_score(
    z: torch.Tensor, eta: float, min_tau: float, ops: TorchOps, group: dist.ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, ms, tau) for this process's unit rows z [V, B, D], with M built from the rows of
    every process in group (all the same shape, concatenated in group rank order)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    # The list form: all_gather_into_tensor is deprecated in torch 2.14 and its successor's
    # output layout depends on the backend (gloo refuses the stacked [W, V, B, D] form).
    parts = [torch.empty_like(z) for _ in range(world)]
    dist.all_gather(parts, z.contiguous(), group=group)
    z_all = torch.cat(parts, dim=1)
    y, ms, tau, info = ops.score(z_all, eta, min_tau)
    failed = failed_views(info)
    if failed:
        y, ms = redo_failed_fp64(z_all, y, ms, tau, failed, eta)
    b = z.shape[1]
    rows = slice(rank * b, (rank + 1) * b)
    return y[:, rows], ms[:, rows], tau


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
                # The same steps as forward_all with the collective between them (so never
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
