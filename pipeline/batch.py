"""The batch contract every loader yields, and the protocol every loader follows.

Views are grouped by resolution so the model runs one forward per resolution:
global_views holds global view 1 of all B samples, then global view 2 of all B samples;
local_views likewise for the locals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch

from mveb.errors import UsageError
from mveb.files import shown

from .recipe import MultiCropRecipe


@dataclass
class MultiCropBatch:
    global_views: torch.Tensor  # [n_global * B, 3, Hg, Wg]
    local_views: torch.Tensor  # [n_local * B, 3, Hl, Wl] (0 rows when there are no locals)
    labels: torch.Tensor | None  # [B] int64, or None for unlabeled data

    def batch_size(self, n_global: int) -> int:
        return self.global_views.shape[0] // n_global

    def views(self, n_global: int, n_local: int) -> list[torch.Tensor]:
        """The V views as a list of [B, 3, H, W] tensors, globals first."""
        out = list(self.global_views.chunk(n_global)) if n_global else []
        if n_local:
            out += list(self.local_views.chunk(n_local))
        return out

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None, non_blocking: bool = True) -> "MultiCropBatch":
        def move(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device=device, dtype=dtype, non_blocking=non_blocking)
            return t.contiguous(memory_format=torch.channels_last)

        labels = self.labels.to(device, non_blocking=non_blocking) if self.labels is not None else None
        return MultiCropBatch(move(self.global_views), move(self.local_views), labels)

    def check(self, recipe: MultiCropRecipe, batch_size: int) -> None:
        """Raise ValueError when this batch breaks the contract for `recipe`."""
        B = batch_size
        exp_g = (recipe.n_global * B, 3, recipe.global_size, recipe.global_size)
        exp_l = (recipe.n_local * B, 3, recipe.local_size, recipe.local_size)
        if tuple(self.global_views.shape) != exp_g:
            raise ValueError(f"global_views has shape {tuple(self.global_views.shape)}, expected {exp_g}")
        if recipe.n_local and tuple(self.local_views.shape) != exp_l:
            raise ValueError(f"local_views has shape {tuple(self.local_views.shape)}, expected {exp_l}")
        for name, t in (("global_views", self.global_views), ("local_views", self.local_views)):
            if t.numel() and not t.is_contiguous(memory_format=torch.channels_last):
                raise ValueError(f"{name} is not channels_last")
            if not t.is_floating_point():
                raise ValueError(f"{name} has dtype {t.dtype}, expected a float dtype")
        if self.labels is not None and tuple(self.labels.shape) != (B,):
            raise ValueError(f"labels has shape {tuple(self.labels.shape)}, expected ({B},)")


def check_loader_args(batch_size: int, rank: int, world_size: int) -> None:
    """The user errors every loader's constructor reports the same way."""
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise UsageError(f"rank {rank} is outside world size {world_size}")


def nothing_decodable(n: int, first: str) -> UsageError:
    return UsageError(f"none of the {n} images can be decoded (the first is {shown(first)}); run `mveb validate` on the set")


class MultiCropLoader(Protocol):
    """What the trainer needs from a loader, whatever the backend.

    Iterating yields the batches of the current epoch from the current position (so a
    loader restored with load_state_dict continues mid-epoch), each a MultiCropBatch on
    the loader's device. Every rank sees its own shard of a seeded permutation.
    """

    def __len__(self) -> int: ...  # batches per epoch on this rank

    def __iter__(self) -> Iterator[MultiCropBatch]: ...

    def set_epoch(self, epoch: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...  # plain Python/tensor values, torch.save-able with weights_only

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
