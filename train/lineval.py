"""Linear evaluation: a linear classifier trained on the frozen backbone's pooled features.

Standard protocol: RandomResizedCrop + flip for the training images (the backbone runs in
eval mode every epoch, so BatchNorm statistics stay frozen), centre crop for validation,
SGD with momentum and a per-step cosine learning rate. `precompute` trades the augmentation
for speed: features of centre crops are computed once and the head trains on them, which
makes a CPU run over a small set take seconds.

The head is BatchNorm1d without affine parameters followed by Linear: still a linear
classifier (the normalization folds into the weights at test time), but its learning rate
no longer depends on the feature scale, which differs wildly between a random-init and a
trained backbone.

Epoch e visits the training set in numpy's default_rng(seed + e) permutation, FFCV's own
RANDOM order, so the order is a function of (seed, epoch) only and a folder and its .beton
shuffle alike. That is what makes a run with `out` (`mveb lineval --out DIR`, files in
train/lineval_state.py) resumable: the head, SGD and scheduler state and the batch offset
are saved at every epoch end, every `checkpoint_minutes` and on SIGTERM/SIGUSR2, and a rerun
continues the same epoch from the next batch. An ImageFolder resumes through a sampler that
starts at that offset, so the batches done are not decoded again; FFCV's Loader cannot start
an epoch mid-way, so a .beton decodes and discards them (no backbone pass: decoding is the
cheap part). A resumed precompute run trains on exactly what an uninterrupted one does; in an
augmented run the crops and flips after a resume are fresh random draws, so its head matches
an uninterrupted run's statistically, not bitwise.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from mveb.errors import UsageError
from train.features import (Features, check_eval_options, check_same_classes, embed, extract_features, feature_width,
                            open_images, prepare)
from train.knn import run_eval
from train.lineval_state import LinevalRun, run_settings, store_result


def linear_head(width: int, num_classes: int) -> nn.Module:
    head = nn.Sequential(nn.BatchNorm1d(width, affine=False), nn.Linear(width, num_classes))
    nn.init.normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


def topk_accuracy(logits: Tensor, labels: Tensor) -> tuple[float, float]:
    """(top-1, top-5) in percent; top-5 is top-C when there are fewer than 5 classes."""
    pred = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = pred == labels.view(-1, 1)
    return 100.0 * hit[:, 0].float().mean().item(), 100.0 * hit.any(dim=1).float().mean().item()


@dataclass
class _Progress:
    """Where training stands: saved with the head, so that a resumed run continues mid-epoch."""

    epoch: int = 0
    batch: int = 0  # batches of `epoch` done
    loss_sum: float = 0.0  # summed over the samples of `epoch` done
    seen: int = 0
    epoch_loss: float = 0.0  # mean loss of the last completed epoch


def train_head(head: nn.Module, epochs: int, batches: _ShuffledFeatures | _AugmentedFeatures, lr: float,
               batch_size: int, device: torch.device, run: LinevalRun | None = None) -> float:
    """SGD (momentum 0.9, no weight decay) with lr x batch/256 on a per-step cosine; returns the last epoch's mean loss.

    `batches.epoch(e, start)` yields epoch e's (features, labels) on `device` from batch `start` on.
    With `run`, training starts from its saved state, if any, and saves into it.
    """
    head.to(device).train()
    steps = len(batches)
    opt = torch.optim.SGD(head.parameters(), lr=lr * batch_size / 256, momentum=0.9, weight_decay=0.0)
    total = max(1, epochs * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    at = _Progress()
    saved = run.load_state(steps) if run is not None else None
    if saved is not None:
        head.load_state_dict(saved["head"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        at = _Progress(**{f.name: saved[f.name] for f in fields(_Progress)})
        batches.skipped.extend(saved["skipped"])

    def state() -> dict:
        return {"head": head.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "steps_per_epoch": steps, "skipped": sorted(set(batches.skipped)), **asdict(at)}

    shield = run.flag.shield_children if run is not None else contextlib.nullcontext
    for epoch in tqdm(range(at.epoch, epochs), initial=at.epoch, total=epochs, desc="linear head", unit="epoch",
                      leave=False):
        epoch_batches = batches.epoch(epoch, at.batch)
        try:
            while True:
                with shield():  # loader workers forked here must not see a job-wide SIGTERM
                    batch = next(epoch_batches, None)
                if batch is None:
                    break
                feats, labels = batch
                loss = F.cross_entropy(head(feats), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                at.batch += 1
                at.loss_sum += loss.item() * len(labels)
                at.seen += len(labels)
                if run is not None:
                    run.after_batch(state, epoch * steps + at.batch,
                                    f"batch {at.batch}/{steps} of epoch {epoch + 1}/{epochs}")
        finally:
            epoch_batches.close()
        if not at.seen:  # else a head that never trained scores chance, and the run exits 0
            raise UsageError(f"no --train image could be decoded ({len(set(batches.skipped))} unreadable); "
                             "run mveb validate on it")
        at = _Progress(epoch + 1, epoch_loss=at.loss_sum / max(at.seen, 1))
        if run is not None:
            run.save_state(state(), (epoch + 1) * steps)
    return at.epoch_loss


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The order epoch `epoch` visits n samples in: FFCV's RANDOM order, numpy's default_rng(seed + epoch)."""
    return torch.from_numpy(np.random.default_rng(seed + epoch).permutation(n))


class _ShuffledFeatures:
    """Minibatches of precomputed features in epoch_order."""

    def __init__(self, feats: Features, batch_size: int, device: torch.device, seed: int) -> None:
        self.feats, self.labels = feats.feats.to(device), feats.labels.to(device)
        self.batch_size, self.seed, self.skipped = batch_size, seed, list(feats.skipped)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def epoch(self, epoch: int, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        order = epoch_order(len(self.labels), self.seed, epoch).to(self.labels.device)
        for first in range(start * self.batch_size, len(order), self.batch_size):
            idx = order[first:first + self.batch_size]
            yield self.feats[idx], self.labels[idx]


class _EpochSampler(torch.utils.data.Sampler[int]):
    """An ImageFolder's sample indices in epoch_order(epoch), from position `start` on (set before each epoch)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.start = n, seed, 0, 0

    def __len__(self) -> int:
        return self.n - self.start

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_order(self.n, self.seed, self.epoch)[self.start:].tolist())


class _AugmentedFeatures:
    """Features of freshly augmented images each pass (the frozen backbone runs every epoch)."""

    def __init__(self, backbone: nn.Module, source: str, image_size: int, batch_size: int, device: torch.device,
                 workers: int | None, seed: int) -> None:
        self.images = open_images(source, image_size, batch_size, augment=True, workers=workers, seed=seed)
        self.backbone, self.device, self.batch_size = prepare(backbone, device), device, batch_size
        self.sampler: _EpochSampler | None = None
        if self.images.samples is not None:  # an ImageFolder: the same loader, drawing from a sampler that resumes
            shuffled = self.images.batches
            self.sampler = _EpochSampler(self.images.num_images, seed)
            self.images.batches = torch.utils.data.DataLoader(
                shuffled.dataset, batch_size=batch_size, sampler=self.sampler, num_workers=shuffled.num_workers,
                generator=shuffled.generator, pin_memory=shuffled.pin_memory)

    @property
    def skipped(self) -> list[str]:
        return self.images.skipped

    def __len__(self) -> int:
        return math.ceil(self.images.num_images / self.batch_size)

    def epoch(self, epoch: int, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        skip = 0
        if self.sampler is not None:
            self.sampler.epoch, self.sampler.start = epoch, start * self.batch_size
        else:
            self.images.batches.next_epoch = epoch  # FFCV's Loader orders an epoch by its seed + next_epoch
            skip = start
        for i, (x, y) in enumerate(self.images):
            if i >= skip:
                yield embed(self.backbone, x, self.device), y.to(self.device)


def linear_eval(backbone: nn.Module, train: str, val: str, image_size: int = 224, batch_size: int = 256,
                epochs: int = 100, lr: float = 0.1, device: torch.device | str = "cpu", precompute: bool = False,
                workers: int | None = None, seed: int = 0, out: str | Path | None = None,
                checkpoint: str | None = None, checkpoint_minutes: float = 30.0) -> dict:
    """Train a linear head on `train`, score it on `val`; top-1/top-5 in percent.

    With `out` the run is resumable (module docstring) and raises `Preempted` once it saved on
    SIGTERM/SIGUSR2; `checkpoint` names where `backbone` came from, one of the settings a resume
    must repeat. A completed run returns its stored result without training.
    """
    device = torch.device(device)
    if out is None:
        return _linear_eval(backbone, train, val, image_size, batch_size, epochs, lr, device, precompute, workers,
                            seed, None)
    settings = run_settings(backbone, checkpoint, train, val, image_size, batch_size, epochs, lr, precompute, seed)
    with LinevalRun(out, settings, checkpoint_minutes) as run:
        stored = run.result()
        if stored is not None:
            return stored
        result = _linear_eval(backbone, train, val, image_size, batch_size, epochs, lr, device, precompute, workers,
                              seed, run)
        run.drop_features()
        return result


def _linear_eval(backbone: nn.Module, train: str, val: str, image_size: int, batch_size: int, epochs: int, lr: float,
                 device: torch.device, precompute: bool, workers: int | None, seed: int,
                 run: LinevalRun | None) -> dict:
    def features(split: str, source: str) -> Features:
        def extract() -> Features:
            return extract_features(backbone, source, image_size, batch_size, device, normalize=False, workers=workers)
        return extract() if run is None else run.features(split, extract)

    val_feats = features("val", val)
    if precompute:
        train_feats = features("train", train)
        check_same_classes(train_feats.classes, train_feats.num_classes, val_feats, train, val)
        num_classes, n_train = train_feats.num_classes, len(train_feats.labels)
        batches: _ShuffledFeatures | _AugmentedFeatures = _ShuffledFeatures(train_feats, batch_size, device, seed)
    else:
        batches = _AugmentedFeatures(backbone, train, image_size, batch_size, device, workers, seed)
        num_classes, n_train = batches.images.num_classes, batches.images.num_images
        check_same_classes(batches.images.classes, num_classes, val_feats, train, val)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = linear_head(feature_width(backbone), num_classes)
    train_loss = train_head(head, epochs, batches, lr, batch_size, device, run)
    head.eval()
    with torch.no_grad():
        top1, top5 = topk_accuracy(head(val_feats.feats.to(device)).cpu(), val_feats.labels)
    return {"top1": top1, "top5": top5, "train_loss": train_loss, "epochs": epochs, "lr": lr,
            "precompute": precompute, "n_train": n_train, "n_val": len(val_feats.labels), "num_classes": num_classes,
            "skipped_images": len(set(batches.skipped)) + len(val_feats.skipped)}


def run_lineval(args: argparse.Namespace) -> dict:
    """`mveb lineval`: one-line table and JSON; with --out also DIR/lineval.json."""
    check_eval_options(args.image_size, args.batch_size, args.workers)
    if args.epochs < 1 or not 0 < args.lr < math.inf:
        raise UsageError(f"need --epochs >= 1 and --lr > 0, got {args.epochs} and {args.lr}")
    if not args.checkpoint_minutes > 0:  # inf: at epoch ends only
        raise UsageError(f"--checkpoint-minutes must be positive, got {args.checkpoint_minutes}")
    mode = "precomputed centre crops" if args.precompute else "augmented"
    result = run_eval(args, "linear eval", lambda backbone, device: linear_eval(
        backbone, args.train, args.val, args.image_size, args.batch_size, args.epochs, args.lr, device,
        args.precompute, args.workers, out=args.out, checkpoint=args.checkpoint,
        checkpoint_minutes=args.checkpoint_minutes), lambda result: f"{args.epochs} epochs, {mode}")
    if args.out is not None:
        store_result(args.out, result)
    return result
