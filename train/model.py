"""The MVEB networks: ResNet backbone + projector (online), and its EMA copy (momentum).

State dict keys are "backbone.*" and "projector.*"; evaluation and export read the
backbone by that prefix.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Callable, ContextManager, Sequence

import torch
import torchvision
from torch import nn

from mveb.errors import UsageError


def build_backbone(arch: str) -> tuple[nn.Module, int]:
    """A torchvision ResNet without its classifier, and its feature width."""
    if not arch.startswith("resnet") or not hasattr(torchvision.models, arch):
        raise UsageError(f"unknown backbone {arch!r}; use a torchvision ResNet such as resnet50 or resnet18")
    net = getattr(torchvision.models, arch)(zero_init_residual=True)
    width = net.fc.in_features
    net.fc = nn.Identity()
    return net, width


def build_projector(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """(Linear without bias - BN - ReLU) x 2, then Linear: the official MVEB projector."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, out_dim),
    )


class Encoder(nn.Module):
    """Backbone + projector over groups of same-resolution images.

    One forward call takes every group of a step (all globals, or all globals then all
    locals), so DDP sees a single forward per backward. Each group is one backbone and
    projector pass, so BatchNorm statistics are computed per group.
    """

    def __init__(self, arch: str, proj_hidden: int, proj_dim: int) -> None:
        super().__init__()
        self.backbone, width = build_backbone(arch)
        self.projector = build_projector(width, proj_hidden, proj_dim)
        # Set by the trainer to time each group as a phase (train/phases.py); no-op otherwise.
        self.timer: Callable[[str], ContextManager[None]] = lambda phase: nullcontext()

    def forward(self, groups: Sequence[torch.Tensor], phases: Sequence[str] = ()) -> list[torch.Tensor]:
        phases = list(phases) or ["forward"] * len(groups)
        out = []
        for x, phase in zip(groups, phases):
            with self.timer(phase):
                out.append(self.projector(self.backbone(x)))
        return out


def compile_backbone(encoder: Encoder) -> None:
    """torch.compile the backbone in place, one static graph per input shape and grad mode.

    The backbone is where the step's time goes (the projector and loss are a few percent).
    Static shapes: a step has two resolutions, and with automatic dynamic shapes the second
    one made torch 2.11's inductor fail a channels_last stride check in the convolution
    backward (H200). State dict keys are unchanged (no "_orig_mod." prefix).
    """
    encoder.backbone.compile(dynamic=False)


def momentum_copy(online: Encoder) -> Encoder:
    """The momentum encoder: a frozen copy of the online one (same weights, no gradients)."""
    # A SyncBatchNorm over a subgroup holds its ProcessGroup, which cannot be copied: the copy
    # shares it (the memo maps it to itself).
    groups = {id(g): g for m in online.modules() if (g := getattr(m, "process_group", None)) is not None}
    momentum = copy.deepcopy(online, groups)
    momentum.timer = lambda phase: nullcontext()
    for p in momentum.parameters():
        p.requires_grad_(False)
    return momentum


@torch.no_grad()
def ema_update(momentum: nn.Module, online: nn.Module, m: float) -> None:
    """momentum <- m * momentum + (1 - m) * online, over all parameters in one foreach call.

    BatchNorm running statistics are not averaged: the momentum encoder keeps its own, from
    its own forward passes, as in the official code.
    """
    torch._foreach_lerp_(list(momentum.parameters()), list(online.parameters()), 1.0 - m)
