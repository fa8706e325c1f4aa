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
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from mveb.errors import UsageError
from train.features import (Features, check_eval_options, check_same_classes, embed, extract_features, feature_width,
                            open_images, prepare)
from train.knn import run_eval


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


def train_head(head: nn.Module, epochs: int, steps_per_epoch: int, batches: Iterable[tuple[Tensor, Tensor]],
               lr: float, batch_size: int, device: torch.device) -> float:
    """SGD (momentum 0.9, no weight decay) with lr x batch/256 on a per-step cosine; returns the last epoch's mean loss.

    `batches` is re-iterated once per epoch and yields (features, labels) on `device`.
    """
    head.to(device).train()
    opt = torch.optim.SGD(head.parameters(), lr=lr * batch_size / 256, momentum=0.9, weight_decay=0.0)
    total = max(1, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    loss_sum = n = 0.0
    for epoch in tqdm(range(epochs), desc="linear head", unit="epoch", leave=False):
        loss_sum = n = 0.0
        for feats, labels in batches:
            loss = F.cross_entropy(head(feats), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(labels)
            n += len(labels)
    return loss_sum / max(n, 1)


class _ShuffledFeatures:
    """Minibatches of precomputed features, reshuffled (seeded) every pass."""

    def __init__(self, feats: Features, batch_size: int, device: torch.device, seed: int) -> None:
        self.feats, self.labels = feats.feats.to(device), feats.labels.to(device)
        self.batch_size, self.generator = batch_size, torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(len(self.labels), generator=self.generator).to(self.labels.device)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            yield self.feats[idx], self.labels[idx]


class _AugmentedFeatures:
    """Features of freshly augmented images each pass (the frozen backbone runs every epoch)."""

    def __init__(self, backbone: nn.Module, source: str, image_size: int, batch_size: int, device: torch.device,
                 workers: int | None, seed: int) -> None:
        self.images = open_images(source, image_size, batch_size, augment=True, workers=workers, seed=seed)
        self.backbone, self.device, self.batch_size = prepare(backbone, device), device, batch_size

    def __len__(self) -> int:
        return math.ceil(self.images.num_images / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.images:
            yield embed(self.backbone, x, self.device), y.to(self.device)


def linear_eval(backbone: nn.Module, train: str, val: str, image_size: int = 224, batch_size: int = 256,
                epochs: int = 100, lr: float = 0.1, device: torch.device | str = "cpu", precompute: bool = False,
                workers: int | None = None, seed: int = 0) -> dict:
    """Train a linear head on `train`, score it on `val`; top-1/top-5 in percent."""
    device = torch.device(device)
    val_feats = extract_features(backbone, val, image_size, batch_size, device, normalize=False, workers=workers)
    if precompute:
        train_feats = extract_features(backbone, train, image_size, batch_size, device, normalize=False,
                                       workers=workers)
        check_same_classes(train_feats.classes, train_feats.num_classes, val_feats, train, val)
        num_classes, n_train, skipped = train_feats.num_classes, len(train_feats.labels), train_feats.skipped
        batches: Iterable = _ShuffledFeatures(train_feats, batch_size, device, seed)
    else:
        augmented = _AugmentedFeatures(backbone, train, image_size, batch_size, device, workers, seed)
        num_classes, n_train = augmented.images.num_classes, augmented.images.num_images
        check_same_classes(augmented.images.classes, num_classes, val_feats, train, val)
        skipped = augmented.images.skipped
        batches = augmented
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = linear_head(feature_width(backbone), num_classes)
    train_loss = train_head(head, epochs, len(batches), batches, lr, batch_size, device)
    head.eval()
    with torch.no_grad():
        top1, top5 = topk_accuracy(head(val_feats.feats.to(device)).cpu(), val_feats.labels)
    return {"top1": top1, "top5": top5, "train_loss": train_loss, "epochs": epochs, "lr": lr,
            "precompute": precompute, "n_train": n_train, "n_val": len(val_feats.labels), "num_classes": num_classes,
            "skipped_images": len(skipped) + len(val_feats.skipped)}


def run_lineval(args: argparse.Namespace) -> dict:
    """`mveb lineval`: one-line table and JSON."""
    check_eval_options(args.image_size, args.batch_size, args.workers)
    if args.epochs < 1 or args.lr <= 0:
        raise UsageError(f"need --epochs >= 1 and --lr > 0, got {args.epochs} and {args.lr}")
    mode = "precomputed centre crops" if args.precompute else "augmented"
    return run_eval(args, "linear eval", lambda backbone, device: linear_eval(
        backbone, args.train, args.val, args.image_size, args.batch_size, args.epochs, args.lr, device,
        args.precompute, args.workers), lambda result: f"{args.epochs} epochs, {mode}")