"""`mveb demo`: the whole job on an embedded real-photo set, on CPU, in a few minutes.

photos -> validate -> FFCV shard -> kNN of a random-init backbone -> MVEB pretraining
(demo preset) -> kNN of the pretrained backbone -> plots -> one summary table.
Each stage runs as far as it can; a stage that fails is reported and the demo goes on.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import traceback
from pathlib import Path
from typing import Any, Callable



def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build the photo set, shard it, pretrain briefly, compare kNN before/after",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="folder for the data, shard, run and plots")
    p.add_argument("--minutes", type=float, default=3.0, help="pretraining time budget")
    p.add_argument("--loader", default="ffcv", choices=["ffcv", "torch", "dali"],
                   help="pretraining loader: ffcv reads the shard (its first batch compiles the numba pipeline, "
                        "about a minute the first time); torch and dali read the photo folder")
    p.set_defaults(func=lambda a: run_demo(Path(a.out), a.minutes, a.loader))


class Stages:
    """Runs named stages, recording each one's result, time and failure without stopping."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float]] = []

    def run(self, name: str, fn: Callable[[], Any], describe: Callable[[Any], str] = str) -> Any:
        print(f"\n== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            value = fn()
            self.rows.append((name, describe(value), time.perf_counter() - t0))
            return value
        except Exception as e:  # the demo must never fail: report the stage and go on
            traceback.print_exc(limit=3)
            self.rows.append((name, f"skipped: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                              time.perf_counter() - t0))
            return None

    def table(self) -> str:
        w = max(len(r[0]) for r in self.rows)
        lines = [f"{'stage':<{w}}  {'seconds':>8}  result", f"{'-' * w}  {'-' * 8}  {'-' * 40}"]
        lines += [f"{n:<{w}}  {s:8.1f}  {v}" for n, v, s in self.rows]
        return "\n".join(lines)


def _knn(source: str | None, arch: str, image_size: int, photos: Path) -> dict:
    from train.features import load_backbone
    from train.knn import backbone_knn

    return backbone_knn(load_backbone(source, arch), photos / "train", photos / "val", image_size, 64, "cpu")


def _pretrain(data: Path, run_dir: Path, minutes: float, loader: str) -> dict:
    """Time a few steps, then resume to the step count that fills the budget (which also shows resume)."""
    from train.config import get_config
    from train.pretrain import pretrain

    def cfg(steps: int):
        return get_config("demo", [f"data.path={data}", f"run.out={run_dir}", f"schedule.steps={steps}",
                                   f"data.loader={loader}"])

    probe_steps = 4
    t0 = time.perf_counter()
    pretrain(cfg(probe_steps))
    spent = time.perf_counter() - t0
    # The last logged step's rate, not the probe's wall time: that includes start-up and, for
    # FFCV, the numba compile of the first batch.
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    per_step = cfg(probe_steps).data.batch_size / last["samples_per_s"]
    total = probe_steps + max(1, int((minutes * 60 - spent) / per_step))
    print(f"about {per_step:.1f} s per step: pretraining to step {total}", flush=True)
    return pretrain(cfg(total))


def run_demo(out: Path, minutes: float = 3.0, loader: str = "ffcv") -> int:
    from mveb.errors import UsageError
    from mveb.files import check_writable

    if not 0 < minutes < math.inf:
        raise UsageError(f"--minutes must be positive, got {minutes}")
    from pipeline.demo_photos import build_photo_folder
    from train.config import get_config

    cfg = get_config("demo")
    arch, image_size = cfg.model.arch, cfg.data.recipe().global_size
    check_writable(out, "--out", folder=True)
    out.mkdir(parents=True, exist_ok=True)
    st = Stages()
    photos = st.run("photo set", lambda: build_photo_folder(out / "photos"),
                    lambda p: f"{sum(1 for _ in (p / 'train').rglob('*.jpg'))} train / "
                              f"{sum(1 for _ in (p / 'val').rglob('*.jpg'))} val JPEGs in {p}")
    if photos is None:
        print(st.table())
        return 0
    from pipeline.validate import validate
    from pipeline.shards import build_shard

    st.run("validate", lambda: validate(photos / "train", report=out / "train.validate.json"),
           lambda r: f"{len(r.good)} decodable, {len(r.bad)} broken")
    shard = out / "train.beton"
    st.run("FFCV shard", lambda: build_shard(photos / "train", shard, max_res=160),
           lambda r: f"{r['written']} images, {r['seconds_per_1000']:.0f} s per 1,000 -> {shard}")
    fmt = lambda r: f"top-1 {r['top1']:.1f}%  top-5 {r['top5']:.1f}%  ({r['n_val']} val crops, {r['num_classes']} classes)"
    before = st.run(f"kNN, random-init {arch}", lambda: _knn(None, arch, image_size, photos), fmt)
    run_dir = out / "run"
    data = shard if loader == "ffcv" else photos / "train"
    st.run(f"pretrain ({loader} loader)", lambda: _pretrain(data, run_dir, minutes, loader),
           lambda r: f"{r['step']} steps, last loss {r['loss']:.4f}, skipped {r['skipped_steps']} -> {run_dir}")
    after = st.run(f"kNN, MVEB-pretrained {arch}", lambda: _knn(str(run_dir), arch, image_size, photos), fmt)
    from train.report import render_report

    st.run("plots", lambda: render_report(run_dir), lambda paths: ", ".join(str(p) for p in paths))
    print("\n" + st.table())
    if before and after:
        print(f"\nkNN top-1 on held-out crops: random init {before['top1']:.1f}%  ->  "
              f"after MVEB pretraining {after['top1']:.1f}%")
    return 0
