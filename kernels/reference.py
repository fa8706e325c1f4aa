"""The MVEB loss written as plainly as the math (DESIGN.md, "MVEB math"): the ground truth.

Two forms of the entropy score, both computed in the dtype they are given (fp64 in, fp64
end to end), with ordinary autograd through the normalization:
- `entropy_score_literal`: the official code's form. It broadcasts the B x B x D tensor
  K[i, j] * x_i / tau and sums over j (the kernel's derivative with respect to its SECOND
  argument), then inverts K + eta I. O(B^2 D) memory: tests and benchmarks only.
- `entropy_score_matrix`: the same math as a row scaling, G = diag(K 1) X / tau, and a
  Cholesky solve. O(B^2 + B D).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

ScoreFn = Callable[[torch.Tensor, float, float], torch.Tensor]


def median_tau(s: torch.Tensor, min_tau: float) -> torch.Tensor:
    """max(min_tau, k-th largest of 1 - S over all B*B entries), k = B*B // 2, per view."""
    flat = (1 - s).flatten(-2)
    k = flat.shape[-1] // 2
    kth = flat.sort(dim=-1, descending=True).values[..., k - 1]
    return kth.clamp(min=min_tau)


def entropy_score_literal(x: torch.Tensor, eta: float = 0.01, min_tau: float = 0.1) -> torch.Tensor:
    """-(K + eta I)^{-1} G with G_i = sum_j K_ij x_i / tau, built as the official B x B x D tensor."""
    x = x.detach()
    s = x @ x.transpose(-1, -2)
    tau = median_tau(s, min_tau)[..., None, None]
    k = torch.exp(s / tau)
    g = (k[..., :, :, None] * x[..., :, None, :] / tau[..., None]).sum(dim=-2)
    eye = torch.eye(x.shape[-2], dtype=x.dtype, device=x.device)
    return -torch.linalg.inv(k + eta * eye) @ g


def entropy_score_matrix(x: torch.Tensor, eta: float = 0.01, min_tau: float = 0.1) -> torch.Tensor:
    """The same score with G = diag(K 1) X / tau and a Cholesky solve: no B x B x D tensor."""
    x = x.detach()
    s = x @ x.transpose(-1, -2)
    tau = median_tau(s, min_tau)[..., None, None]
    k = torch.exp(s / tau)
    g = k.sum(dim=-1, keepdim=True) * x / tau
    eye = torch.eye(x.shape[-2], dtype=x.dtype, device=x.device)
    return -torch.cholesky_solve(g, torch.linalg.cholesky(k + eta * eye))


def entropy(z: torch.Tensor, score_fn: ScoreFn, eta: float, min_tau: float) -> torch.Tensor:
    """-mean_b <stopgrad(score_b), z_b>: its gradient with respect to z is -score / B."""
    score = score_fn(z, eta, min_tau)
    return -(score * z).sum(dim=-1).mean(dim=-1)


def view_targets(t1: torch.Tensor, t2: torch.Tensor, views: int) -> list[torch.Tensor]:
    """What each view aligns with: view 1 -> t_2, view 2 -> t_1, locals -> (t_1 + t_2) / 2."""
    mid = (t1 + t2) / 2
    return [t2, t1] + [mid] * (views - 2)


def mveb_loss_reference(
    online: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    lam: float = 0.01,
    eta: float = 0.01,
    min_tau: float = 0.1,
    score_fn: ScoreFn = entropy_score_matrix,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, align, mean entropy over views), view by view, autograd through normalize."""
    z = [F.normalize(o, dim=-1) for o in online]
    t1, t2 = (F.normalize(t.detach(), dim=-1) for t in targets)
    views = len(z)
    align = sum((zv * tv).sum(dim=-1).mean() for zv, tv in zip(z, view_targets(t1, t2, views)))
    ent = torch.stack([entropy(zv, score_fn, eta, min_tau) for zv in z])
    loss = -(align / views) - lam * ent.sum() / views
    return loss, align.detach(), ent.mean().detach()


def mveb_loss_literal(
    online: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    lam: float = 0.01,
    eta: float = 0.01,
    min_tau: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official form end to end: B x B x D broadcast and an explicit inverse per view."""
    return mveb_loss_reference(online, targets, lam, eta, min_tau, score_fn=entropy_score_literal)
