"""MVEB loss and entropy score: the one entry point every caller uses (DESIGN.md, "MVEB math").

    from kernels import mveb_loss, entropy_score
    loss = mveb_loss(online, targets)                       # scalar, differentiable
    loss, parts = mveb_loss(online, targets, return_parts=True)
    loss = mveb_loss(online, targets, gather_group=torch.distributed.group.WORLD)  # global-batch entropy
    score = entropy_score(x)                                # x: unit rows [B, D]

Triton is imported only when the Triton implementation is asked for, so CPU-only users
without triton can import this package.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence, Union

import torch
import torch.distributed as dist

from kernels.loss import MvebLossFunction, entropy_score_batched
from kernels.reference import mveb_loss_literal, mveb_loss_reference
from kernels.torch_ops import TorchOps, ieee_fp32_matmul

__all__ = ["mveb_loss", "entropy_score", "IMPLS"]

IMPLS = ("auto", "triton", "torch", "reference", "reference-literal")

Views = Union[torch.Tensor, Sequence[torch.Tensor]]


def mveb_loss(
    online: Views,
    targets: Views,
    lam: float = 0.01,
    eta: float = 0.01,
    min_tau: float = 0.1,
    impl: str = "auto",
    return_parts: bool = False,
    gather_group: dist.ProcessGroup | None = None,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The MVEB loss -(align / V) - lam * sum_v entropy(z_v) / V, normalization inside.

    online: V >= 2 tensors [B, D] (or one [V, B, D]) of raw projector outputs, the 2 global
        views first; gradients flow back to them.
    targets: 2 tensors [B, D] (or one [2, B, D]) of raw momentum projections of the two
        global views; treated as constants (no gradient).
    impl: "auto" (Triton on CUDA when triton imports, torch elsewhere), "triton", "torch",
        "reference" (the plain matrix form with autograd) or "reference-literal" (the
        official B x B x D form; O(B^2 D) memory, for tests and benchmarks).
    Inputs may be fp32, bf16 or fp16 (computed in fp32, IEEE products, autocast off inside)
    or fp64 (fp64 end to end). The returned loss is a 0-d tensor in that compute dtype.
    return_parts: also return {"align": 0-d, "entropy": 0-d mean over views, "tau": [V]}
        ("tau" not from the reference impls), detached tensors for logging (call .item()
        when you log: it syncs the GPU).
    A non-finite input gives a NaN loss (the reference impls raise torch.linalg.LinAlgError).
    A view whose fp32 inversion of K + eta I fails (Cholesky, or the Triton sweep's residual
    check) is redone in fp64; checking for that costs one device-to-host sync per call.
    On CUDA at B <= 512 the Triton forward is captured once per shape as a CUDA graph and
    replayed (kernels/graphs.py); it is not used while the caller itself captures a graph,
    nor with a gather_group.
    gather_group: None (default): each process's entropy is computed on its local batch, as
        the official code does; no collective. A torch.distributed ProcessGroup (e.g.
        torch.distributed.group.WORLD, which is None before init_process_group): each view's
        score is computed from the unit rows of every process in the group (the detached
        rows; every process must pass the same V, B, D and dtype; rows are concatenated in
        group rank order), and each process keeps the score rows of its own samples. The
        loss is then the same formula over the local rows: align unchanged,
        entropy_v = -mean over the local rows of <stopgrad(score_b), z_b>, so the gradient
        is still -score_b / B (B local). Hence the mean of the processes' losses equals the
        single-process loss over the concatenated batch, and each process's gradient divided
        by the group size W equals the single-process gradient rows of its samples: with DDP
        averaging gradients over W processes, the update is the single-process update over
        the global batch. The views are shared out: view v's (W B) x (W B) system is solved
        by group rank v % W only, so each process solves at most ceil(V / W) systems (none
        when W > V and its rank >= V), and two all_to_alls move the rows: each process
        sends its V B D rows and gets V B (D + 2) values back, and an owner also receives
        and returns W B D per owned view (about 2 V B D each way when W divides V, where an
        all_gather received W V B D). "tau" in the parts is the global batch's, the same on
        every process. A group of size 1 gives the None result.
        Not supported by the reference impls (ValueError).
    """
    online_t = _stack(online, "online")
    targets_t = _stack(targets, "targets")
    _check(online_t, targets_t, impl, gather_group)
    if impl.startswith("reference"):
        return _reference(online_t, targets_t, lam, eta, min_tau, impl, return_parts)
    loss, align, entropy, tau = MvebLossFunction.apply(online_t, targets_t, lam, eta, min_tau, _ops(impl, online_t),
                                                       gather_group)
    if return_parts:
        return loss, {"align": align, "entropy": entropy, "tau": tau}
    return loss


def entropy_score(x: torch.Tensor, eta: float = 0.01, min_tau: float = 0.1) -> torch.Tensor:
    """-(K + eta I)^{-1} diag(K 1) X / tau for unit rows x [B, D] (or [V, B, D]); no gradient."""
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3) or not x.is_floating_point():
        raise ValueError(f"entropy_score: x must be a float tensor [B, D] or [V, B, D], got {_describe(x)}")
    if x.shape[-2] < 2:
        raise ValueError(f"entropy_score: needs a batch of at least 2 rows, got shape {tuple(x.shape)}")
    batched = x if x.dim() == 3 else x[None]
    score = entropy_score_batched(batched, eta, min_tau, _ops("auto", batched))
    return score.to(x.dtype) if x.dim() == 3 else score[0].to(x.dtype)


def _stack(views: Views, what: str) -> torch.Tensor:
    if isinstance(views, torch.Tensor):
        return views
    views = list(views)
    if not views or not all(isinstance(v, torch.Tensor) for v in views):
        raise ValueError(f"mveb_loss: {what} must be a tensor or a non-empty sequence of tensors")
    if len({(v.shape, v.dtype, v.device) for v in views}) != 1:
        raise ValueError(f"mveb_loss: the {what} tensors differ in shape, dtype or device: "
                         + ", ".join(_describe(v) for v in views))
    return torch.stack(views)


def _check(online: torch.Tensor, targets: torch.Tensor, impl: str, gather_group: object) -> None:
    if impl not in IMPLS:
        raise ValueError(f"mveb_loss: impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if gather_group is not None and impl.startswith("reference"):
        raise ValueError(f"mveb_loss: gather_group is not supported by impl={impl!r}; use 'auto', 'torch' or 'triton'")
    if gather_group is not None and not isinstance(gather_group, dist.ProcessGroup):
        raise ValueError(f"mveb_loss: gather_group must be a torch.distributed ProcessGroup or None, "
                         f"got {type(gather_group).__name__}")
    if online.dim() != 3 or online.shape[0] < 2:
        raise ValueError(f"mveb_loss: online must be V >= 2 views [B, D] (or one [V, B, D]), got {_describe(online)}")
    if targets.dim() != 3 or targets.shape[0] != 2 or targets.shape[1:] != online.shape[1:]:
        raise ValueError(f"mveb_loss: targets must be 2 tensors shaped like one online view {tuple(online.shape[1:])}, "
                         f"got {_describe(targets)}")
    if online.shape[1] < 2:
        raise ValueError(f"mveb_loss: needs a batch of at least 2 samples, got B={online.shape[1]}")
    if not online.is_floating_point() or not targets.is_floating_point():
        raise ValueError(f"mveb_loss: inputs must be floating point, got {online.dtype} and {targets.dtype}")
    if online.device != targets.device:
        raise ValueError(f"mveb_loss: online is on {online.device} but targets on {targets.device}")


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return type(x).__name__


def _ops(impl: str, x: torch.Tensor) -> TorchOps:
    use_triton = impl == "triton" or (impl == "auto" and x.is_cuda)
    if not use_triton:
        return _TORCH_OPS
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("mveb_loss: impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
    try:
        return _triton_ops()
    except ImportError as e:
        if impl == "auto":
            return _TORCH_OPS
        raise ValueError(f"mveb_loss: impl='triton' needs the triton package ({e}); use impl='torch'") from e


_TORCH_OPS = TorchOps()


@functools.lru_cache(maxsize=1)
def _triton_ops() -> TorchOps:
    """One shared instance: it holds the captured CUDA graphs."""
    from kernels.triton_ops import TritonOps

    return TritonOps()


def _reference(
    online: torch.Tensor, targets: torch.Tensor, lam: float, eta: float, min_tau: float, impl: str, return_parts: bool
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    dtype = torch.float64 if online.dtype == torch.float64 else torch.float32
    fn = mveb_loss_literal if impl == "reference-literal" else mveb_loss_reference
    with torch.autocast(online.device.type, enabled=False), ieee_fp32_matmul():
        loss, align, entropy = fn(online.to(dtype), targets.to(dtype), lam, eta, min_tau)
    if return_parts:
        return loss, {"align": align, "entropy": entropy}
    return loss
