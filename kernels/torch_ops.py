"""The batched building blocks of the MVEB loss in plain PyTorch: all V views in each op.

`TorchOps` is the op set the autograd Function in kernels/loss.py calls; the Triton op set
(kernels/triton_ops.py) overrides the steps it fuses and inherits the rest, so both share
one Cholesky, one retry policy and one closed-form gradient (computed in the forward).

Two ways to get Y = M Z = (K + eta I)^{-1} diag(r) Z / tau (score = -Y), chosen by B:
- B < solve_min_b: P = (K + eta I)^{-1} (B x B), M = P diag(r) / tau, Y = M Z. Batched
  B x B work is cheap and cuBLAS GEMMs beat D-wide triangular solves at small B.
- B >= solve_min_b: a Cholesky and a triangular solve against diag(r) Z / tau per view
  (2 B^2 D flops, what the reference does), instead of the inverse's ~3 B^3 + 2 B^2 D: at
  B=4096, D=2048 the inverse path ran 100 ms against the reference's 74 ms (H200, 8 views).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch


@contextlib.contextmanager
def ieee_fp32_matmul() -> Iterator[None]:
    """fp32 GEMMs with IEEE products inside: exp(S / tau) amplifies a TF32 error in S by 1 / tau."""
    matmul = torch.backends.cuda.matmul
    # fp32_precision is the current API; torch before 2.9 only has allow_tf32.
    flag, ieee = ("fp32_precision", "ieee") if hasattr(matmul, "fp32_precision") else ("allow_tf32", False)
    before = getattr(matmul, flag)
    setattr(matmul, flag, ieee)
    try:
        yield
    finally:
        setattr(matmul, flag, before)


@functools.lru_cache(maxsize=64)
def view_weights(views: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[V, 2] weights of (t_1, t_2) in each view's alignment target: (0,1), (1,0), (1/2,1/2)...
    Cached: building it is a host-to-device copy."""
    w = torch.full((views, 2), 0.5, dtype=dtype)
    w[0] = torch.tensor([0.0, 1.0])
    w[1] = torch.tensor([1.0, 0.0])
    return w.to(device)


# H200, 8 views, D=2048: with the inverse path the loss ran 2x faster than the reference at
# B=1024 and slower at B=4096. `mveb bench kernels` times triton-solve (the solve at every B)
# beside it, to place this crossover.
SOLVE_MIN_B = 2048


class TorchOps:
    """Every step as batched PyTorch ops; works on any device and in fp32 or fp64.
    solve_min_b: the smallest B that takes the per-view Cholesky solve instead of the inverse."""

    name = "torch"

    def __init__(self, solve_min_b: int = SOLVE_MIN_B) -> None:
        self.solve_min_b = solve_min_b

    def forward_all(
        self, online: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype, eta: float, min_tau: float, lam: float
    ) -> tuple[torch.Tensor, ...]:
        """(loss, align, entropy, tau, grad, info, z, norms, t, rowdot, y, ms): the whole loss
        and its gradient with no host sync, as if every view's fp32 inversion succeeded.

        grad = d loss / d online for a unit upstream gradient, in `dtype`: it needs nothing the
        forward does not already have, so the backward only scales it. info != 0 marks the
        views the caller must redo in fp64 (from z ... ms, then loss_and_grad again).
        """
        z, norms, t, rowdot = self.normalize_align(online, targets, dtype)
        y, ms, tau, info = self.score(z, eta, min_tau)
        loss, align, entropy, grad = self.loss_and_grad(z, norms, t, rowdot, y, ms, lam)
        return loss, align, entropy, tau, grad, info, z, norms, t, rowdot, y, ms

    def loss_and_grad(
        self, z: torch.Tensor, norms: torch.Tensor, t: torch.Tensor, rowdot: torch.Tensor, y: torch.Tensor,
        ms: torch.Tensor, lam: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, align, mean entropy, unit gradient) once Y and the row sums are known."""
        loss, align, entropy, dots = self.finish(rowdot, ms, lam)
        return loss, align, entropy, self.grad_online(y, z, t, dots, norms, lam)

    def score(
        self, z: torch.Tensor, eta: float, min_tau: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Y = M Z = -score [V, B, D], row sums of M * S = <y_b, z_b> [V, B], tau [V], info [V])
        for unit rows z [V, B, D]."""
        s = self.gram(z)
        a, r, tau = self.kernel_matrix(s, eta, min_tau)
        if z.shape[1] >= self.solve_min_b:
            del s  # B x B per view: at B=4096 the largest buffer, and the solve no longer needs it
            y, info = self.solve(a, z * (r / tau[:, None])[..., None])
            return y, (y * z).sum(dim=-1), tau, info
        p, info = self.spd_inverse(a)
        m, ms = self.operator(p, r, tau, s)
        with ieee_fp32_matmul():
            return torch.bmm(m, z), ms, tau, info

    def solve(self, a: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A^{-1} W, info) view by view: the single-matrix cuSOLVER Cholesky and solve (the
        batched calls may take MAGMA or potrfBatched, built for small matrices)."""
        y = torch.empty_like(w)
        infos = []
        for v in range(a.shape[0]):
            factor, info = torch.linalg.cholesky_ex(a[v])
            y[v] = torch.cholesky_solve(w[v], factor)
            infos.append(info)
        return y, torch.stack(infos)

    def normalize_align(
        self, online: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """z = online / |online|, t = targets / |targets|, norms [V, B], rowdot[v, b] = <z_vb, target_vb>."""
        o = online.to(dtype)
        norms = o.norm(dim=-1).clamp_min(1e-12)
        z = o / norms[..., None]
        t = targets.to(dtype)
        t = t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        zt = torch.einsum("vbd,jbd->vbj", z, t)
        rowdot = (zt * view_weights(z.shape[0], dtype, z.device)[:, None, :]).sum(dim=-1)
        return z, norms, t, rowdot

    def gram(self, z: torch.Tensor) -> torch.Tensor:
        with ieee_fp32_matmul():
            return torch.bmm(z, z.transpose(1, 2))

    def kernel_matrix(
        self, s: torch.Tensor, eta: float, min_tau: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, r, tau): tau = max(min_tau, 1 - k-th smallest of S), k = B*B // 2, then exp_kernel."""
        flat = s.flatten(1)
        k = flat.shape[1] // 2
        if not flat.is_cuda:
            kth = flat.kthvalue(k, dim=1).values
        elif s.shape[-1] < self.solve_min_b:
            # On CUDA a full sort is faster than kthvalue (0.10 vs 0.28 ms, 8 x 256^2, H200).
            kth = flat.sort(dim=1).values[:, k - 1]
        else:
            # One view at a time, as the reference: the batched sort's values and int64
            # indices of all views at once are 1.5 GiB at B=4096.
            kth = torch.stack([row.sort().values[k - 1] for row in flat])
        tau = (1 - kth).clamp_min(min_tau)
        return *self.exp_kernel(s, tau, eta), tau

    def exp_kernel(self, s: torch.Tensor, tau: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """A = exp((S - 1) / tau) + eta exp(-1 / tau) I and r = exp((S - 1) / tau) 1.

        Scaling K and eta by exp(-1 / tau) leaves the score unchanged and keeps exp <= 1.
        """
        k = torch.exp((s - 1) / tau[:, None, None])
        r = k.sum(dim=-1)
        k.diagonal(dim1=1, dim2=2).add_((eta * torch.exp(-1 / tau))[:, None])
        return k, r

    def spd_inverse(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A^{-1}, info) by Cholesky and the inverse of the B x B factor: no D-wide solve."""
        factor, info = torch.linalg.cholesky_ex(a)
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
        linv = torch.linalg.solve_triangular(factor, eye, upper=False)
        with ieee_fp32_matmul():
            return torch.bmm(linv.transpose(1, 2), linv), info

    def operator(
        self, p: torch.Tensor, r: torch.Tensor, tau: torch.Tensor, s: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """M = P diag(r) / tau (score = -M Z) and the row sums of M * S (<-score_b, z_b>)."""
        m = p * (r / tau[:, None])[:, None, :]
        return m, (m * s).sum(dim=-1)

    def finish(
        self, rowdot: torch.Tensor, ms: torch.Tensor, lam: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, align, mean entropy, dots) from the align row dots and the row sums of M * S.

        entropy_v = sum_b ms[v, b] / B; dots = rowdot + lam ms, so that the row dot
        <z, d loss / d z> = -(rowdot + lam ms) / (V B) is known to the gradient's one pass.
        """
        views, b = rowdot.shape
        align = rowdot.sum() / b
        entropy = ms.sum() / (views * b)
        return -(align / views + lam * entropy), align, entropy, rowdot + lam * ms

    def grad_online(
        self, y: torch.Tensor, z: torch.Tensor, t: torch.Tensor, dots: torch.Tensor, norms: torch.Tensor, lam: float
    ) -> torch.Tensor:
        """d loss / d online for a unit upstream gradient: dz = scale (target + lam y), scale =
        -1 / (V B), y = M z, then through the normalization: (dz - z <z, dz>) / |online|, with
        <z, dz> = scale * dots."""
        views, b, _ = z.shape
        scale = -1.0 / (views * b)
        w = view_weights(views, z.dtype, z.device)
        dz = torch.einsum("vj,jbd->vbd", w, t).add_(y, alpha=lam) * scale
        return (dz - z * (scale * dots)[..., None]) / norms[..., None]
