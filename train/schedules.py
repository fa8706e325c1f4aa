"""Per-step learning-rate and EMA-momentum schedules of the official MVEB recipe.

Both are pure functions of the step index, so a resumed run recomputes exactly the values
an uninterrupted run would have used; nothing about them lives in a checkpoint.
"""

from __future__ import annotations

import math


def learning_rate(step: int, peak: float, warmup_steps: int, total_steps: int, min_ratio: float = 1e-3) -> float:
    """Linear warmup from min to peak over W steps, then cosine towards min over T steps.

    The cosine argument is (s - W) / T, not (s - W) / (T - W), as in the official code: the
    last step ends a hair above min instead of exactly on it.
    """
    low = min_ratio * peak
    if step < warmup_steps:
        return low + (peak - low) * step / warmup_steps
    return low + (peak - low) * (1 + math.cos(math.pi * (step - warmup_steps) / total_steps)) / 2


def ema_momentum(step: int, base: float, total_steps: int) -> float:
    """m(s) = 1 - (1 - base) (cos(pi s / T) + 1) / 2: base at step 0, 1 at step T."""
    return 1 - (1 - base) * (math.cos(math.pi * step / total_steps) + 1) / 2


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule: base_lr is quoted per 256 samples."""
    return base_lr * global_batch / 256
