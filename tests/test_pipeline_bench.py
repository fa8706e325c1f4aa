"""`mveb bench loader` runs real loaders side by side and reports what it could not run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mveb.cli import main
from pipeline import loaders


def test_bench_loader_cli_writes_json(photo_train: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # A backend whose module is not installed stands for FFCV/DALI on a machine without them.
    monkeypatch.setitem(loaders.BACKENDS, "ghost", ("pipeline.ghost_loader", "GhostLoader", "pip install ghost"))
    out = tmp_path / "bench.json"
    code = main(["bench", "loader", "--data", str(photo_train), "--backends", "torch,ghost", "--batch-size", "8",
                 "--workers", "2", "--seconds", "2", "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "torch" in table and "ghost" in table and "pip install ghost" in table
    report = json.loads(out.read_text())
    torch_row, ghost_row = report["results"]
    assert torch_row["backend"] == "torch" and torch_row["images_per_s"] > 0 and torch_row["compile_s"] > 0
    assert torch_row["images"] == torch_row["batches"] * 8 and torch_row["timed_s"] >= 2
    # The work happens in worker processes, so their CPU time must be counted: the full recipe
    # costs ~25 ms of CPU per image here, the main process alone (normalize, IPC) ~5 ms.
    assert torch_row["cpu_s"] / torch_row["images"] > 0.008
    assert torch_row["cpu_s"] < (2 + 1) * torch_row["timed_s"] * 1.2  # 2 workers + main at most
    # Each image is all its views: the default recipe has 8.
    assert torch_row["views_per_s"] == pytest.approx(8 * torch_row["images_per_s"], rel=0.01)
    assert ghost_row["backend"] == "ghost" and "not available" in ghost_row["skipped"]
    assert report["views"] == "2x224+6x96"


def test_bench_loader_user_errors(photo_train: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args, says in ((["--data", str(tmp_path / "none")], "does not exist"),
                       (["--data", str(photo_train), "--backends", "torch,tf"], "unknown backend"),
                       (["--data", str(photo_train), "--seconds", "0"], "--seconds")):
        assert main(["bench", "loader", *args]) == 2
        assert says in capsys.readouterr().err
