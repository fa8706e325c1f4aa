"""One MVEB training step, built from a Config: the loop and `mveb bench step` both run it.

    trainer = Trainer(cfg, dist_info, steps_per_epoch)
    out = trainer.step(batch, step)   # {"loss", "align", "entropy", "lr", "momentum", "skipped"}
                                      # (tensors stay on the device: reading one is a host sync)

The step reads in phase order (train/phases.py names): ema, forward_global, forward_local,
momentum_forward, loss, backward, optimizer. Schedules are functions of the step index, so
the trainer holds no schedule state.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ContextManager

import torch
from torch.nn.parallel import DistributedDataParallel

from kernels import mveb_loss
from mveb.errors import UsageError
from pipeline.batch import MultiCropBatch

from .config import Config
from .distributed import DistInfo, node_group
from .lars import LARS, lars_param_groups
from .model import Encoder, compile_backbone, ema_update, momentum_copy
from .phases import PhaseTimer
from .schedules import ema_momentum, learning_rate, scaled_lr


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `amp` on `device`; None means plain fp32.

    bf16 and fp16 apply on CUDA; a CPU run is fp32. CPU bf16 autocast was measured here
    (oneDNN, torch 2.14) to give sporadic inf/NaN conv weight gradients (3 of 4 steps
    skipped in some runs, none in others, same inputs), and it was barely faster.
    bf16 on a GPU without bf16 math falls back to fp32 too.
    """
    if amp not in ("bf16", "fp16", "fp32"):
        raise UsageError(f"precision.amp={amp!r}; use bf16, fp16 or fp32")
    if amp == "fp32" or device.type != "cuda":
        return None
    if amp == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else None


class Trainer:
    def __init__(self, cfg: Config, dist: DistInfo, steps_per_epoch: int, timer: PhaseTimer | None = None) -> None:
        self.cfg, self.dist = cfg, dist
        self.recipe = cfg.data.recipe()
        self.device = dist.device
        self.global_batch = cfg.data.batch_size * dist.world_size
        self.peak_lr = scaled_lr(cfg.optim.base_lr, self.global_batch)
        self.total_steps = cfg.schedule.epochs * steps_per_epoch
        self.warmup_steps = cfg.schedule.warmup_epochs * steps_per_epoch
        self.amp = amp_dtype(cfg.precision.amp, self.device)
        self.timer = timer or PhaseTimer(self.device)
        # Counted on the device: reading it is a host sync, done only when it is logged or saved.
        self._skipped = torch.zeros((), dtype=torch.int64, device=self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        online: torch.nn.Module = Encoder(cfg.model.arch, cfg.model.proj_hidden, cfg.model.proj_dim)
        online = online.to(device=self.device, memory_format=torch.channels_last)
        # SyncBatchNorm has no CPU kernel: a gloo (CPU) run keeps per-process BatchNorm.
        if dist.is_distributed and cfg.model.sync_bn and self.device.type == "cuda":
            group = node_group() if cfg.model.sync_bn_group == "node" else None
            online = torch.nn.SyncBatchNorm.convert_sync_batchnorm(online, process_group=group)
        if cfg.precision.compile:
            compile_backbone(online)
        online.timer = self.timer
        self.online: Encoder = online  # type: ignore[assignment]
        # DDP broadcasts rank 0's weights on construction; the momentum copy is taken after.
        self.model = (DistributedDataParallel(online, device_ids=[self.device] if self.device.type == "cuda" else None,
                                              gradient_as_bucket_view=True)
                      if dist.is_distributed else online)
        self.momentum = momentum_copy(self.online)  # a copy is eager: compile_backbone does not carry over
        if cfg.precision.compile:
            compile_backbone(self.momentum)
        o = cfg.optim
        self.optimizer = LARS(lars_param_groups(self.online.parameters()), lr=self.peak_lr,
                              weight_decay=o.weight_decay, momentum=o.momentum, trust_coefficient=o.trust_coefficient)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp == torch.float16 else None
        global_entropy = cfg.loss.entropy_batch == "global" and dist.is_distributed
        self.entropy_group = torch.distributed.group.WORLD if global_entropy else None

    def autocast(self) -> ContextManager[Any]:
        if self.amp is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def lr_at(self, step: int) -> float:
        return learning_rate(step, self.peak_lr, self.warmup_steps, self.total_steps, self.cfg.optim.min_lr_ratio)

    def momentum_at(self, step: int) -> float:
        return ema_momentum(step, self.cfg.schedule.ema_momentum, self.total_steps)

    def _groups(self, batch: MultiCropBatch, B: int) -> tuple[list[torch.Tensor], list[str], list[torch.Tensor]]:
        """(online inputs, their phase names, momentum inputs: the first two global views)."""
        r = self.recipe
        if self.cfg.model.per_view_forward:
            views = batch.views(r.n_global, r.n_local)
            return views, ["forward_global"] * r.n_global + ["forward_local"] * r.n_local, views[:2]
        groups = [batch.global_views] + ([batch.local_views] if r.n_local else [])
        return groups, ["forward_global", "forward_local"][:len(groups)], [batch.global_views[:2 * B]]

    @staticmethod
    def _split(outputs: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
        """Per-view [B, D] outputs from per-group ones (a group of k views is k stacked blocks)."""
        return [view for out in outputs for view in out.split(batch_size)]

    def step(self, batch: MultiCropBatch, step: int) -> dict[str, Any]:
        """One optimizer step at schedule index `step` (0-based). Tensors in the result are detached."""
        t, r, c = self.timer, self.recipe, self.cfg
        lr, m = self.lr_at(step), self.momentum_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with t("ema"):
            ema_update(self.momentum, self.online, m)

        B = batch.batch_size(r.n_global)
        inputs, phases, momentum_inputs = self._groups(batch, B)
        with self.autocast():
            online = self._split(self.model(inputs, phases=phases), B)
            with t("momentum_forward"), torch.no_grad():
                targets = self._split(self.momentum(momentum_inputs), B)

        with t("loss"):
            loss, parts = mveb_loss(online, targets, lam=c.loss.lam, eta=c.loss.eta, min_tau=c.loss.min_tau,
                                    impl=c.loss.impl, return_parts=True, gather_group=self.entropy_group)
        with t("backward"):
            (self.scaler.scale(loss) if self.scaler else loss).backward()

        with t("optimizer"):
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            finite = self._grads_finite()
            if self.scaler:  # the scaler hands LARS its own non-finite flag (no host read) and lowers its scale
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                # Skipped on the device: a host read of the flag here would stall the GPU once a
                # step, idle while the host then launches the optimizer, EMA and next forward.
                self.optimizer.step(found_inf=(~finite).float())
            self.optimizer.zero_grad(set_to_none=True)
        self._skipped += ~finite
        return {"loss": loss.detach(), "align": parts["align"], "entropy": parts["entropy"],
                "lr": lr, "momentum": m, "skipped": ~finite}

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients so far (a host sync)."""
        return int(self._skipped)

    def _grads_finite(self) -> torch.Tensor:
        """A 0-d bool tensor on the device: every gradient finite."""
        grads = [p.grad for p in self.online.parameters() if p.grad is not None]
        return torch.stack(torch._foreach_norm(grads)).sum().isfinite()

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.online.state_dict(), "momentum": self.momentum.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else {},
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.online.load_state_dict(state["model"])
        self.momentum.load_state_dict(state["momentum"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self._skipped.fill_(int(state.get("skipped_steps", 0)))
