"""`mveb export`: a run's backbone as a plain torchvision ResNet state_dict.

`torchvision.models.<arch>()` loads the file with strict=False missing only fc.weight and
fc.bias: the classifier is not part of self-supervised pretraining.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from mveb.errors import UsageError
from mveb.files import write_atomic
from train.checkpoint import is_checkpoint_path
from train.features import load_backbone


def export_backbone(run: str | Path, out: str | Path, arch: str | None = None) -> Path:
    """Write the backbone of a run folder's newest checkpoint (or of a checkpoint file) to `out`."""
    if str(out).endswith("/") or Path(out).is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name such as {Path(out) / 'backbone.pth'}")
    out = Path(out)
    if is_checkpoint_path(out):
        raise UsageError(f"--out {out} is in a run's checkpoint folder, whose resume would load it as its newest "
                         f"checkpoint and fail; write the backbone elsewhere, e.g. {out.parent.parent / 'backbone.pth'}")
    if Path(run).is_file() and out.resolve() == Path(run).resolve():
        raise UsageError(f"--out {out} is the checkpoint being read; write the backbone to another file")
    # Loading into the architecture first validates the weights, so a wrong file fails here,
    # not in the user's downstream code.
    state = load_backbone(run, arch).state_dict()
    data = io.BytesIO()
    torch.save(state, data)
    write_atomic(out, data.getvalue())
    return Path(out)
