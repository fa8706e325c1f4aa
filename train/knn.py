"""Weighted kNN accuracy (InstDisc/DINO monitor): the k nearest training features vote exp(sim / T).

With unit-norm features, sim is the cosine similarity; each of the k nearest neighbours
adds exp(sim / T) to its class, and the classes with the largest sums are the predictions.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Callable
from pathlib import Path

import torch
from torch import Tensor

from mveb.errors import UsageError
from mveb.devices import resolve_device
from mveb.files import check_writable, write_atomic
from pipeline.images import check_same_class_folders
from train.features import check_eval_options, check_same_classes, extract_features, load_backbone

K = 200
TEMPERATURE = 0.1


def knn_votes(train_feats: Tensor, train_labels: Tensor, val_feats: Tensor, k: int = K,
              T: float = TEMPERATURE, num_classes: int | None = None) -> Tensor:
    """Per-class vote sums [N_val, C] of the k nearest training features (k clipped to the bank)."""
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    k = min(k, len(train_feats))
    sim = val_feats.to(train_feats) @ train_feats.T
    top_sim, top_idx = sim.topk(k, dim=1)
    votes = torch.zeros(len(val_feats), num_classes, dtype=sim.dtype, device=sim.device)
    return votes.scatter_add_(1, train_labels.to(sim.device)[top_idx], (top_sim / T).exp())


def knn_eval(train_feats: Tensor, train_labels: Tensor, val_feats: Tensor, val_labels: Tensor,
             k: int = K, T: float = TEMPERATURE, num_classes: int | None = None, chunk: int = 256) -> dict:
    """Top-1/top-5 accuracy (percent) of weighted kNN; runs on train_feats' device, `chunk` queries at a time.

    A chunk's similarity matrix is chunk x N_train fp32: 1.3 GB against ImageNet's 1.28M bank.
    """
    if len(train_feats) == 0 or len(val_feats) == 0:
        raise ValueError("kNN needs at least one training and one validation feature")
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    train_labels = train_labels.to(train_feats.device)
    top = min(5, num_classes)
    hits1 = hits5 = 0
    for start in range(0, len(val_feats), chunk):
        votes = knn_votes(train_feats, train_labels, val_feats[start:start + chunk], k, T, num_classes)
        pred = votes.topk(top, dim=1).indices.cpu()
        hit = pred == val_labels[start:start + chunk].cpu().view(-1, 1)
        hits1 += int(hit[:, 0].sum())
        hits5 += int(hit.any(dim=1).sum())
    n = len(val_feats)
    return {"top1": 100.0 * hits1 / n, "top5": 100.0 * hits5 / n, "k": min(k, len(train_feats)), "T": T,
            "n_train": len(train_feats), "n_val": n, "num_classes": num_classes}


def backbone_knn(backbone: torch.nn.Module, train: str | Path, val: str | Path, image_size: int = 224,
                 batch_size: int = 256, device: torch.device | str = "cpu", k: int = K, T: float = TEMPERATURE,
                 workers: int | None = None, progress: bool = True) -> dict:
    """kNN accuracy of a backbone: `train` is the memory bank, `val` is scored (the demo's and monitor's call)."""
    device = torch.device(device)
    bank = extract_features(backbone, train, image_size, batch_size, device, workers=workers, progress=progress)
    queries = extract_features(backbone, val, image_size, batch_size, device, workers=workers, progress=progress)
    check_same_classes(bank.classes, bank.num_classes, queries, str(train), str(val))
    result = knn_eval(bank.feats.to(device), bank.labels, queries.feats, queries.labels, k=k, T=T,
                      num_classes=bank.num_classes)
    result["skipped_images"] = len(bank.skipped) + len(queries.skipped)
    return result


def run_knn(args: argparse.Namespace) -> dict:
    """`mveb knn`: features of --train (the bank) and --val, weighted kNN, one-line table and JSON."""
    check_eval_options(args.image_size, args.batch_size, args.workers)
    if args.k < 1 or not 0 < args.temperature < math.inf:
        raise UsageError(f"need --k >= 1 and --temperature > 0, got {args.k} and {args.temperature}")
    return run_eval(args, "kNN", lambda backbone, device: backbone_knn(
        backbone, args.train, args.val, args.image_size, args.batch_size, device, args.k, args.temperature,
        args.workers), lambda result: f"k={result['k']} T={result['T']:g}")


def run_eval(args: argparse.Namespace, what: str, evaluate: Callable[[torch.nn.Module, torch.device], dict],
             setting: Callable[[dict], str]) -> dict:
    """The part `mveb knn` and `mveb lineval` share: backbone, device, timing, printing, JSON."""
    start = time.perf_counter()
    check_writable(None if args.json == "-" else args.json, "--json")  # before the features, not after
    device = resolve_device(args.device)
    backbone = load_backbone(args.checkpoint, args.arch)
    check_same_class_folders(("--train", args.train), ("--val", args.val))  # before any feature
    result = evaluate(backbone, device)
    result.update(checkpoint=args.checkpoint, arch=backbone.arch_name, image_size=args.image_size,
                  seconds=time.perf_counter() - start)
    print(format_result(what, result, setting(result)))
    write_result(args.json, result)
    return result


def format_result(what: str, result: dict, setting: str) -> str:
    source = result["checkpoint"] or "random init"
    skipped = f", {result['skipped_images']} unreadable images skipped" if result["skipped_images"] else ""
    return (f"{what} {setting} | top-1 {result['top1']:6.2f} | top-5 {result['top5']:6.2f} | "
            f"{source} | train {result['n_train']}, val {result['n_val']}, {result['num_classes']} classes"
            f"{skipped} | {result['seconds']:.1f} s")


def write_result(path: str | None, result: dict) -> None:
    """JSON to a file (atomically) or to stdout for '-'; nothing for None."""
    if path is None:
        return
    text = json.dumps(result, indent=2, default=str)
    if path == "-":
        print(text)
        return
    write_atomic(path, text + "\n")
