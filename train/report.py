"""`mveb report`: PNG plots of a run's metrics.jsonl (loss terms, schedules, throughput, data wait, kNN)."""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

from mveb.errors import UsageError
from mveb.files import write_atomic

# One PNG per entry, one stacked panel per metric, all against the optimizer step.
FIGURES: dict[str, tuple[tuple[str, str], ...]] = {
    "loss": (("loss", "loss"), ("align", "alignment"), ("entropy", "entropy")),
    "schedule": (("lr", "learning rate"), ("momentum", "EMA momentum")),
    "throughput": (("samples_per_s", "samples / s"),),
    "data_wait": (("data_wait_fraction", "fraction of step time waiting for data"),),
    "knn": (("knn_top1", "kNN top-1 %"), ("knn_top5", "kNN top-5 %")),
}


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl, by step; the records of one step (training, kNN monitor) are
    merged, and a resumed run's repeated steps keep the newest values.

    Unreadable lines (a process killed mid-write) are skipped and counted on stderr.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} does not exist (is this a run folder? metrics appear after the first logged step)")
    by_step: dict[int, dict] = {}
    bad = 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            by_step.setdefault(int(record["step"]), {}).update(record)
        except (ValueError, KeyError, TypeError):
            bad += 1
    if bad:
        sys.stderr.write(f"warning: skipped {bad} unreadable line(s) of {path}\n")
    if not by_step:
        raise UsageError(f"{path} holds no metrics yet (nothing logged; train for at least one logged step)")
    return [by_step[s] for s in sorted(by_step)]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            steps.append(int(r["step"]))
            values.append(float(v))
    return steps, values


def render_report(run: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write one PNG per figure that has data into `out` (default RUN/plots); return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    run = Path(run)
    records = read_metrics(run / "metrics.jsonl")
    out = Path(out) if out else run / "plots"
    written = []
    for name, panels in FIGURES.items():
        data = [(label, *_series(records, key)) for key, label in panels]
        data = [d for d in data if d[1]]
        if not data:
            continue
        fig, axes = plt.subplots(len(data), 1, figsize=(8, 2.6 * len(data)), sharex=True, squeeze=False)
        for ax, (label, steps, values) in zip(axes[:, 0], data):
            ax.plot(steps, values, marker="." if len(steps) < 50 else None)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.suptitle(f"{run.name}: {name.replace('_', ' ')}")
        fig.tight_layout()
        path = out / f"{name}.png"
        png = io.BytesIO()
        fig.savefig(png, dpi=100, format="png")
        plt.close(fig)
        write_atomic(path, png.getvalue())
        written.append(path)
    return written
