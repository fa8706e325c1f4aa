"""The MVEB loss for all V views at once, with a closed-form backward.

Per view (DESIGN.md, "MVEB math"), with M = (K + eta I)^{-1} diag(K 1) / tau:
    score = -M Z,   entropy = -mean_b <score_b, z_b> = sum_ij M_ij S_ij / B,
so the forward needs only B x B matrices and the backward one GEMM, M Z, per view:
    d loss / d z_v = -(target_v + lam M_v z_v) / (V B).
The row dots <z, d loss / d z> that the normalization's backward needs are also known from
the forward (the align row dots and the row sums of M * S), so the backward is one pass.
"""

from __future__ import annotations

import math

import torch

from kernels.torch_ops import TorchOps, ieee_fp32_matmul

_TORCH = TorchOps()


def score_operator(
    z: torch.Tensor, s: torch.Tensor, eta: float, min_tau: float, ops: TorchOps
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M [V, B, B], row sums of M * S [V, B], tau [V]) for unit rows z and S = z z^T.

    score = -M Z. A view whose fp32 Cholesky fails is redone in fp64 from z (one host sync).
    """
    a, r, tau = ops.kernel_matrix(s, eta, min_tau)
    p, info = ops.spd_inverse(a)
    m, ms = ops.operator(p, r, tau, s)
    failed = torch.nonzero(info).flatten().tolist()
    if failed:
        m, ms = m.clone(), ms.clone()
        m[failed], ms[failed] = (x.to(m.dtype) for x in _retry_fp64(z[failed], tau[failed], eta))
    return m, ms, tau


def _retry_fp64(z: torch.Tensor, tau: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, row sums of M * S) of the views whose fp32 Cholesky failed, from a fp64 Gram
    matrix (exp of a true Gram matrix is positive definite; a rounded fp32 one may not be).
    NaN where even fp64 fails."""
    z = z.double()
    s = torch.bmm(z, z.transpose(1, 2))
    a, r = _TORCH.exp_kernel(s, tau.double(), eta)
    p, info = _TORCH.spd_inverse(a)
    m, ms = _TORCH.operator(p.masked_fill((info != 0)[:, None, None], math.nan), r, tau.double(), s)
    return m, ms


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64 (tests compare to the literal form at 1e-10); everything else runs in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class MvebLossFunction(torch.autograd.Function):
    """(loss, align, mean entropy, tau) from online [V, B, D] and targets [2, B, D]."""

    @staticmethod
    def forward(ctx, online, targets, lam, eta, min_tau, ops):  # type: ignore[override]
        with torch.autocast(online.device.type, enabled=False):
            z, norms, t, rowdot = ops.normalize_align(online, targets, compute_dtype(online))
            s = ops.gram(z)
            m, ms, tau = score_operator(z, s, eta, min_tau, ops)
            loss, align, entropy_mean, dots = ops.finish(rowdot, ms, lam)
        ctx.save_for_backward(z, norms, t, m, dots)
        ctx.lam, ctx.ops, ctx.in_dtype = lam, ops, online.dtype
        ctx.mark_non_differentiable(align, entropy_mean, tau)
        return loss, align, entropy_mean, tau

    @staticmethod
    def backward(ctx, grad_loss, _align, _entropy, _tau):  # type: ignore[override]
        z, norms, t, m, dots = ctx.saved_tensors
        with torch.autocast(z.device.type, enabled=False):
            grad = ctx.ops.grad_online(m, z, t, dots, norms, grad_loss.to(z.dtype), ctx.lam, ctx.in_dtype)
        return grad, None, None, None, None, None


def entropy_score_batched(x: torch.Tensor, eta: float, min_tau: float, ops: TorchOps) -> torch.Tensor:
    """-M X for unit rows x [V, B, D], computed in fp32 (fp64 for fp64 input)."""
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        z = x.to(compute_dtype(x))
        m, _, _ = score_operator(z, ops.gram(z), eta, min_tau, ops)
        with ieee_fp32_matmul():
            return -torch.bmm(m, z)
