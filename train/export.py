"""`mveb export`: a run's backbone as a plain torchvision ResNet state_dict.

`torchvision.models.<arch>()` loads the file with strict=False missing only fc.weight and
fc.bias: the classifier is not part of self-supervised pretraining.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mveb.files import written_atomically
from train.features import load_backbone


def export_backbone(run: str | Path, out: str | Path, arch: str | None = None) -> Path:
    """Write the backbone of a run folder's newest checkpoint (or of a checkpoint file) to `out`."""
    # Loading into the architecture first validates the weights, so a wrong file fails here,
    # not in the user's downstream code.
    state = load_backbone(run, arch).state_dict()
    out = Path(out)
    with written_atomically(out) as tmp:
        torch.save(state, tmp)
    return out
