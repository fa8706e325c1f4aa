"""`mveb bench kernels`: a tiny real run on this machine, its JSON, and its user errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from kernels.bench import BENCH_IMPLS
from mveb.cli import main


def test_bench_kernels_cpu_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kernels.json"
    rc = main(["bench", "kernels", "--device", "cpu", "--batch-sizes", "8,13", "--dim", "32", "--views", "3",
               "--seconds", "0", "--json", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| 13 | torch |" in table and "skipped: needs CUDA" in table
    doc = json.loads(out.read_text())
    assert doc["views"] == 3 and doc["dim"] == 32
    rows = {(r["impl"], r["batch"]): r for r in doc["results"]}
    assert set(rows) == {(i, b) for i in BENCH_IMPLS for b in (8, 13)}
    assert {"triton-solve", "triton-eager"} <= set(BENCH_IMPLS)
    for impl in ("reference-literal", "reference", "torch"):
        assert rows[(impl, 13)]["ms"] > 0 and rows[(impl, 13)]["steps"] >= 2
    assert rows[("triton", 8)]["skipped"] == "needs CUDA"
    assert not list(tmp_path.glob("*.tmp*"))


def test_bench_kernels_skips_literal_beyond_memory_budget(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "kernels", "--device", "cpu", "--batch-sizes", "4096", "--impls", "reference-literal"])
    assert rc == 1  # the only case asked for was skipped: nothing measured
    assert "skipped: B x B x D tensor alone is 128.00 GiB" in capsys.readouterr().out


def test_bench_kernels_that_measures_nothing_exits_1_with_why(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Every case skipped (Triton on a CPU) once exited 0, as if it had measured: a script took an
    empty table for a result. The table and the JSON are still written."""
    out = tmp_path / "kernels.json"
    assert main(["bench", "kernels", "--device", "cpu", "--impls", "triton,triton-eager", "--batch-sizes", "8,16",
                 "--dim", "16", "--views", "3", "--json", str(out)]) == 1
    captured = capsys.readouterr()
    assert "| 16 | triton-eager | - |" in captured.out
    assert captured.err.splitlines()[-1] == ("mveb bench kernels: nothing measured: triton B=8, triton-eager B=8, "
                                             "triton B=16, triton-eager B=16: needs CUDA")
    assert [r["skipped"] for r in json.loads(out.read_text())["results"]] == ["needs CUDA"] * 4


def test_a_case_that_raises_is_a_failed_row_not_the_end_of_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """One case raising (a Triton compile error at one B, on the GPU) once aborted the run with
    a traceback: the cases measured before it were lost, those after it never ran."""
    import kernels.bench as bench_module

    def broken(online: object, targets: object) -> None:
        raise RuntimeError("PassManager::run failed\n(the compiler's dump)")

    loss_fn = bench_module._loss_fn
    monkeypatch.setattr(bench_module, "_loss_fn", lambda impl: broken if impl == "torch" else loss_fn(impl))
    out = tmp_path / "k.json"
    assert main(["bench", "kernels", "--device", "cpu", "--impls", "torch,reference", "--batch-sizes", "8,16",
                 "--dim", "16", "--views", "3", "--seconds", "0", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    for b in (8, 16):
        assert f"| {b} | torch | - | - | - | - | - | - | - | failed: RuntimeError: PassManager::run failed |" in table
    rows = {(r["impl"], r["batch"]): r for r in json.loads(out.read_text())["results"]}
    assert rows[("torch", 16)]["error"] == "RuntimeError: PassManager::run failed"
    assert rows[("reference", 16)]["ms"] > 0 and rows[("reference", 16)]["error"] is None


def test_bench_kernels_unwritable_json_is_refused_before_measuring(unwritable: Callable[[str], Path],
                                                                   calls: Callable[[object, str], list],
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """It once measured every case, printed the table and only then failed to write."""
    import kernels.bench as bench_module

    path = unwritable("k.json")
    measured = calls(bench_module, "bench_one")
    assert main(["bench", "kernels", "--device", "cpu", "--impls", "torch", "--batch-sizes", "8", "--dim", "16",
                 "--views", "3", "--seconds", "0", "--json", str(path)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mveb bench: error: --json {path}"), err
    assert measured == [] and "| 8 | torch |" not in captured.out


@pytest.mark.parametrize("argv, message", [
    (["--device", "cpu", "--impls", "fused"], "--impls takes a comma list"),
    (["--device", "cpu", "--batch-sizes", "1,x"], "--batch-sizes takes a comma list"),
    (["--device", "cpu", "--views", "1"], "--views must be >= 2"),
    (["--device", "cpu", "--dtype", "fp8"], "--dtype must be one of"),
    (["--device", "cuda"], "CUDA is not available"),
])
def test_bench_kernels_user_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if argv[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["bench", "kernels", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.gpu
def test_bench_kernels_cuda_runs_every_impl(tmp_path: Path) -> None:
    out = tmp_path / "kernels.json"
    assert main(["bench", "kernels", "--device", "cuda", "--batch-sizes", "128", "--seconds", "0.2", "--json", str(out)]) == 0
    rows = {r["impl"]: r for r in json.loads(out.read_text())["results"]}
    assert all(rows[i]["ms"] > 0 and rows[i]["peak_mib"] >= 0 for i in BENCH_IMPLS)
    # host syncs stay a fixed few per step (2 measured on an H200: the fp64-retry check and one
    # more), and the graph replaces the forward's launches
    assert rows["triton"]["syncs"] <= 2
    assert 0 < rows["triton"]["launches"] < rows["triton-eager"]["launches"]
