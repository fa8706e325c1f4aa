"""`mveb report`: PNG plots of a run's metrics.jsonl (loss terms, schedules, throughput, data wait, kNN)."""

from __future__ import annotations

import io
import json
import math
import statistics
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


def summarize(run: str | Path) -> str:
    """Where a run stands, in a few lines for a terminal (a cluster login node has no image viewer)."""
    run = Path(run)
    records = read_metrics(run / "metrics.jsonl")
    train = [r for r in records if isinstance(r.get("loss"), (int, float))]
    last = records[-1]
    where = f"{run}: step {last['step']}"
    try:  # the schedule's length from the saved config and the logged epoch (= step / steps per epoch)
        schedule = json.loads((run / "config.json").read_text())["schedule"]
        per_epoch = round(last["step"] / last["epoch"])
        total = schedule["epochs"] * per_epoch
        stop = min(schedule["steps"] or total, total)
        where += f" of {stop} ({100 * last['step'] / stop:.0f}%), epoch {last['epoch']:g} of {schedule['epochs']}"
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        pass
    lines = [where]
    if train:
        t = train[-1]
        lines.append(f"loss {t['loss']:.4f} (align {t.get('align', math.nan):.4f}, entropy "
                     f"{t.get('entropy', math.nan):.4f}) at step {t['step']}, lr {t.get('lr', math.nan):.4g}, "
                     f"{t.get('skipped_steps', 0)} skipped steps")
        recent = train[-20:]
        rates, waits = ([r[k] for r in recent if isinstance(r.get(k), (int, float))]
                        for k in ("samples_per_s", "data_wait_fraction"))
        if rates and waits:
            lines.append(f"throughput {statistics.median(rates):.1f} samples/s, data wait "
                         f"{100 * statistics.median(waits):.1f}% (medians of the last {len(recent)} logged steps)")
    knn = [r for r in records if isinstance(r.get("knn_top1"), (int, float))]
    if knn:
        best = max(knn, key=lambda r: r["knn_top1"])
        lines.append(f"kNN top-1 {knn[-1]['knn_top1']:.2f}% at step {knn[-1]['step']} "
                     f"(best {best['knn_top1']:.2f}% at step {best['step']})")
    return "\n".join(lines)


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
