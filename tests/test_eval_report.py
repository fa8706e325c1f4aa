"""`mveb report`: PNG plots from metrics.jsonl, and one-line errors when there is nothing to plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import pytest

from mveb.cli import main
from train.report import read_metrics, render_report, summarize


def _write_metrics(run: Path, steps: range, extra_lines: tuple[str, ...] = ()) -> None:
    lines = [json.dumps({"step": s, "epoch": s / 10, "loss": 1.0 / s, "align": -s / 30, "entropy": 0.1 + s / 100,
                         "lr": 0.1 * min(1, s / 5), "momentum": 0.996 + 0.0001 * s, "samples_per_s": 40 + s % 3,
                         "data_wait_fraction": 0.25, "skipped_steps": 0}) for s in steps]
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("\n".join(lines + list(extra_lines)) + "\n")


def test_report_renders_four_png_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    _write_metrics(run, range(1, 21))
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    names = ["loss", "schedule", "throughput", "data_wait"]
    printed = out[-len(names):]
    assert printed == [str(run / "plots" / f"{n}.png") for n in names]
    assert out[0] == f"{run}: step 20"  # no config.json: the schedule's length is unknown
    for path in printed:
        img = matplotlib.image.imread(path)
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert img.shape[0] > 100 and img.std() > 0.01  # something drawn, not a blank canvas
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(f"{n}.png" for n in names)


def test_resumed_steps_keep_the_newest_record_and_bad_lines_are_skipped(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    again = json.dumps({"step": 3, "loss": 7.0})
    _write_metrics(run, range(1, 6), extra_lines=('{"step": 6, "loss": 0.', again))
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and records[2]["loss"] == 7.0
    assert "skipped 1 unreadable line" in capsys.readouterr().err


def test_missing_metric_keys_leave_out_their_panels(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": math.exp(-s)}) + "\n"
                                               for s in range(5)))
    assert [p.name for p in render_report(run, tmp_path / "plots")] == ["loss.png"]


@pytest.mark.parametrize("content", [None, "", "\n\n"])
def test_missing_or_empty_metrics_is_a_one_line_error(content: str | None, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "metrics.jsonl" in err
    assert not (tmp_path / "plots").exists()


def test_the_summary_says_where_the_run_stands(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_metrics(run, range(1, 31), extra_lines=(
        json.dumps({"step": 10, "epoch": 1.0, "knn_top1": 41.5, "knn_top5": 80.0}),
        json.dumps({"step": 30, "epoch": 3.0, "knn_top1": 38.25, "knn_top5": 79.0})))
    (run / "config.json").write_text(json.dumps({"schedule": {"epochs": 8, "steps": None}}))
    lines = summarize(run).splitlines()
    assert lines[0] == f"{run}: step 30 of 80 (38%), epoch 3 of 8"  # 10 steps an epoch
    assert lines[1].startswith("loss 0.0333 (align -1.0000, entropy 0.4000) at step 30, lr 0.1,")
    assert lines[2] == "throughput 41.0 samples/s, data wait 25.0% (medians of the last 20 logged steps)"
    assert lines[3] == "kNN top-1 38.25% at step 30 (best 41.50% at step 10)"
