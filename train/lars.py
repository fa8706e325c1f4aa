"""LARS with torch._foreach ops: a handful of multi-tensor kernels per step, no per-parameter math loop.

Parameters with ndim <= 1 (biases, BatchNorm weights and biases) skip weight decay and the
trust-ratio adaptation, as in the official recipe (and barlowtwins' LARS).

LARS is SGD with momentum on an adapted gradient, trust * (grad + wd p): the adaptation is
done in place on the gradients, then torch's fused SGD kernel applies momentum and the step.
That kernel takes `found_inf`, a device flag that turns the whole update into a no-op, so a
step with non-finite gradients is skipped without the host reading anything back.
"""

from __future__ import annotations

from typing import Iterable

import torch


def lars_param_groups(params: Iterable[torch.nn.Parameter]) -> list[dict]:
    """Split parameters into the adapted group (matrices, conv kernels) and the plain one."""
    params = [p for p in params if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim > 1], "lars": True},
        {"params": [p for p in params if p.ndim <= 1], "lars": False},
    ]


class LARS(torch.optim.Optimizer):
    # GradScaler then hands over its device flag as `self.found_inf` instead of reading it back
    # on the host to decide whether to call step(): fp16 steps stay free of host syncs too.
    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable, lr: float, weight_decay: float = 1e-6, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        trust_coefficient=trust_coefficient, lars=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None, found_inf: torch.Tensor | None = None):  # type: ignore[override]
        """One update; with found_inf (a float 0-d tensor on the parameters' device) != 0 the
        parameters and momentum buffers stay as they are. The gradients are overwritten.
        Under a GradScaler, call scaler.unscale_(optimizer) first: the trust ratio needs the
        true gradient norms."""
        if getattr(self, "grad_scale", None) is not None:
            del self.grad_scale, self.found_inf  # GradScaler deletes them only after a step that returns
            raise RuntimeError("LARS needs unscaled gradients: call scaler.unscale_(optimizer) before scaler.step")
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p.grad.stride() != p.stride():  # the fused kernel needs one memory order per triple
                    p.grad = torch.empty_like(p).copy_(p.grad)
            grads = [p.grad for p in params]
            if group["lars"]:
                torch._foreach_add_(grads, params, alpha=group["weight_decay"])
                p_norm = torch.stack(torch._foreach_norm(params))
                u_norm = torch.stack(torch._foreach_norm(grads))
                # A zero norm (fresh zero-init weights, or a zero update) keeps the plain step.
                trust = torch.where((p_norm > 0) & (u_norm > 0),
                                    group["trust_coefficient"] * p_norm / u_norm, torch.ones_like(p_norm))
                torch._foreach_mul_(grads, list(trust.unbind()))
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                elif state["momentum_buffer"].stride() != p.stride():  # e.g. restored from another layout
                    state["momentum_buffer"] = torch.empty_like(p).copy_(state["momentum_buffer"])
                bufs.append(state["momentum_buffer"])
            params, grads, bufs = map(list, zip(*map(_dense_views, params, grads, bufs)))
            # buf = momentum buf + update; p -= lr buf (zero buffers at the start, so no first-step case).
            torch._fused_sgd_(params, grads, bufs, weight_decay=0.0, momentum=group["momentum"], lr=group["lr"],
                              dampening=0.0, nesterov=False, maximize=False, is_first_step=False,
                              found_inf=found_inf)
        return loss


def _dense_views(p: torch.Tensor, g: torch.Tensor, buf: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A channels_last conv kernel with its gradient and buffer (all three with the same
    strides), as contiguous (permuted) views of the same memory. The fused kernel walks raw
    memory; given channels_last tensors its CPU version made contiguous copies every step (14 ms
    of a 335 ms demo step, measured with `mveb bench step --profile`)."""
    if p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last):
        return tuple(t.permute(0, 2, 3, 1) for t in (p, g, buf))
    return p, g, buf
