"""`mveb bench loader` runs real loaders side by side and reports what it could not run."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from torch.utils.data import DataLoader, Dataset

from mveb.cli import main
from pipeline import loaders


class _RaisingDataset(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> None:
        raise ValueError(f"sample {index} cannot be augmented")


class WorkerFailsLoader:
    """A backend whose DataLoader worker raises: DataLoader re-raises the error in the main
    process with the worker's whole traceback as its message, as a torch loader's would."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __iter__(self) -> Iterator[object]:
        return iter(DataLoader(_RaisingDataset(), num_workers=1))


@pytest.fixture
def broken_backend(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(loaders.BACKENDS, "broken", (__name__, "WorkerFailsLoader", "nothing to install"))
    return "broken"


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
                       (["--data", str(photo_train), "--seconds", "0"], "--seconds"),
                       (["--data", str(photo_train), "--workers", "-1"], "--workers must be 0"),
                       (["--data", str(photo_train), "--device", "gpu"], "unknown device 'gpu'")):
        assert main(["bench", "loader", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err


def test_bench_loader_that_measures_nothing_exits_1_with_why(photo_train: Path, tmp_path: Path, broken_backend: str,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Every backend failed or skipped once exited 0, the failure only a traceback in the note."""
    monkeypatch.setitem(loaders.BACKENDS, "ghost", ("pipeline.ghost_loader", "GhostLoader", "pip install ghost"))
    assert main(["bench", "loader", "--data", str(photo_train), "--backends", f"{broken_backend},ghost",
                 "--seconds", "0.1", "--json", str(tmp_path / "bench.json")]) == 1
    captured = capsys.readouterr()
    broken_row = next(line for line in captured.out.splitlines() if line.startswith("broken"))
    assert broken_row.endswith("  ValueError: sample 0 cannot be augmented"), captured.out
    assert "Traceback" not in captured.out
    assert captured.err.splitlines()[-1] == ("mveb bench loader: nothing measured: broken: ValueError: sample 0 "
                                             "cannot be augmented; ghost: the ghost loader is not available here "
                                             "(No module named 'pipeline.ghost_loader'); install it with pip install ghost")
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["results"][0]["error"] == "ValueError: sample 0 cannot be augmented"


def test_bench_loader_with_one_backend_failing_exits_0_with_a_one_line_note(
        photo_train: Path, broken_backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "loader", "--data", str(photo_train), "--backends", f"torch,{broken_backend}",
                 "--batch-size", "2", "--workers", "1", "--seconds", "0.1"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[-1].startswith("broken ") and table[-1].endswith("  ValueError: sample 0 cannot be augmented")
    assert table[-2].startswith("torch ") and len(table) == 4, table


def test_bench_loader_unwritable_json_is_refused_before_measuring(unwritable: Callable[[str], Path], photo_train: Path,
                                                                  calls: Callable[[object, str], list],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """It once timed every backend and only then failed to write the JSON."""
    import pipeline.bench as bench_module

    path = unwritable("bench.json")
    timed = calls(bench_module, "bench_backend")
    assert main(["bench", "loader", "--data", str(photo_train), "--backends", "torch", "--batch-size", "2",
                 "--workers", "1", "--seconds", "0.1", "--json", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mveb bench: error: --json {path}"), err
    assert timed == []
