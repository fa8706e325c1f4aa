"""`mveb demo`: the whole job on an embedded real-photo set, on CPU, in a few minutes."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build the photo set, shard it, pretrain briefly, compare kNN before/after",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="folder for the data, shard, run and plots")
    p.add_argument("--minutes", type=float, default=4.0, help="pretraining time budget")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    raise NotImplementedError
