"""`mveb bench step` and `bench all` on this machine's CPU: every variant runs, the phases add up
to the step, the loader-fed rows are compared with the synthetic step they feed, and the parts
of `bench all` can run apart."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from mveb.bench_step import bench_step, format_table
from train.phases import PHASES


def test_step_bench_phases_add_up_and_loader_is_compared(photo_train: Path) -> None:
    report = bench_step("cpu", batch_size=4, loaders=("synthetic", "torch"), data=str(photo_train), steps=3,
                        priority_stream=True)
    rows = {r["variant"]: r for r in report["results"]}
    assert list(rows) == ["official-style", "mveb", "mveb torch", "mveb torch +priority"]
    for r in rows.values():
        assert set(r["phases_ms"]) == set(PHASES)
        # The phases cover the whole step: what is left is Python between them.
        assert abs(r["unaccounted_ms"]) <= 0.05 * r["step_ms"], r
    fed = rows["mveb torch"]
    assert fed["data_wait_fraction"] > 0 and fed["phases_ms"]["data_wait"] > 0
    for fed in (rows["mveb torch"], rows["mveb torch +priority"]):
        assert fed["ratio_to_synthetic"] == pytest.approx(fed["samples_per_s"] / rows["mveb"]["samples_per_s"])
    assert "ratio_to_synthetic" not in rows["mveb"]
    table = format_table(report)
    assert table.count("\n") == 1 + len(rows) and "x synthetic" in table


def test_step_bench_reports_a_failing_variant_and_runs_the_rest(tmp_path: Path) -> None:
    """A loader that cannot start (an ImageFolder with no images) is an error row; the
    synthetic variants before it keep their numbers and the table still prints."""
    (tmp_path / "empty" / "class0").mkdir(parents=True)
    report = bench_step("cpu", batch_size=4, loaders=("synthetic", "torch"), data=str(tmp_path / "empty"), steps=2,
                        official=False, priority_stream=True)
    rows = {r["variant"]: r for r in report["results"]}
    assert list(rows) == ["mveb", "mveb torch", "mveb torch +priority"]
    assert rows["mveb"]["samples_per_s"] > 0
    assert "error" in rows["mveb torch"] and "error" in rows["mveb torch +priority"]
    assert "failed: " in format_table(report)


@pytest.mark.slow
def test_step_bench_compile_feeds_the_loader_to_the_compiled_step(photo_train: Path) -> None:
    report = bench_step("cpu", batch_size=4, loaders=("synthetic", "torch"), data=str(photo_train), steps=2,
                        official=False, compile=True)
    rows = {r["variant"]: r for r in report["results"]}
    assert list(rows) == ["mveb", "mveb+compile", "mveb+compile torch"]
    fed, compiled = rows["mveb+compile torch"], rows["mveb+compile"]
    assert fed["ratio_to_synthetic"] == pytest.approx(fed["samples_per_s"] / compiled["samples_per_s"])
    assert compiled["ratio_to_mveb_synthetic"] == pytest.approx(compiled["samples_per_s"] / rows["mveb"]["samples_per_s"])
    assert compiled["skipped_steps"] == 0


def test_step_bench_times_a_runs_own_config(tmp_path: Path) -> None:
    from train.config import get_config

    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(get_config("demo", ["data.batch_size=4", "data.n_local=0"]).to_dict()))
    report = bench_step("cpu", steps=1, official=False, config=str(saved))
    assert [r["batch_size"] for r in report["results"]] == [4]  # the run's batch, not the bench default 8
    assert report["recipe"]["n_local"] == 0


@pytest.mark.slow
def test_bench_all_parts_run_apart_and_merge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`bench all` split over two calls (as a GPU host's time limit per call may need) gives one
    results.json, summary and chart holding both parts."""
    from mveb.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "all", "--device", "cpu", "--out", str(out), "--parts", "kernels"]) == 0
    first = json.loads((out / "results.json").read_text())
    assert "kernels" in first and "step" not in first and not (out / "photos").exists()
    alone = (out / "summary.md").read_text()  # a part not run is left out, not reported as failed
    assert "## MVEB loss" in alone and "## Loader" not in alone and "failed" not in alone
    assert main(["bench", "all", "--device", "cpu", "--out", str(out), "--parts", "step"]) == 0
    both = json.loads((out / "results.json").read_text())
    assert both["kernels"] == first["kernels"]
    assert [r["variant"] for r in both["step"]["results"]] == ["official-style", "mveb", "mveb torch"]
    summary = (out / "summary.md").read_text()
    assert "## MVEB loss" in summary and "## Training step" in summary and (out / "chart.png").stat().st_size > 0
    assert "Device work by kind" in summary and all("device" in r for r in both["step"]["results"])
    capsys.readouterr()
    assert main(["bench", "all", "--device", "cpu", "--out", str(out), "--parts", "kernels,gpu"]) == 2
    assert "--parts takes a comma list" in capsys.readouterr().err


def test_bench_all_parts_refuse_to_merge_another_devices_results(tmp_path: Path) -> None:
    """--parts keeps the other parts of an earlier results.json: one from another device (a GPU
    run in the same folder) is refused rather than summarized as this machine's."""
    from mveb.bench_all import bench_all
    from mveb.errors import UsageError

    out = tmp_path / "bench"
    out.mkdir()
    gpu_run = json.dumps({"device": "cuda", "step_b128": {"results": []}})
    (out / "results.json").write_text(gpu_run)
    with pytest.raises(UsageError, match="holds a run on cuda"):
        bench_all("cpu", None, out, parts=("kernels",))
    assert (out / "results.json").read_text() == gpu_run


@pytest.mark.slow
def test_step_bench_under_torchrun_reports_exposed_communication(tmp_path: Path) -> None:
    """Two gloo ranks as torchrun starts them: rank 0 reports the one-process and the DDP step
    and their difference; rank 1 stays quiet. A run's config.json times that run's batch."""
    import os
    import socket
    import subprocess
    import sys

    from train.config import get_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out, saved = tmp_path / "ddp.json", tmp_path / "config.json"
    saved.write_text(json.dumps(get_config("demo", ["data.batch_size=4"]).to_dict()))
    cmd = [sys.executable, "-m", "mveb", "bench", "step", "--device", "cpu", "--config", str(saved), "--steps", "2",
           "--profile", "--json", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
             for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    assert "exposed communication" in outs[0][0] and outs[1][0] == ""
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["backend"] == "gloo"
    assert [r["variant"] for r in report["results"]] == ["mveb, one process", "mveb, DDP x 2"]
    assert [r["batch_size"] for r in report["results"]] == [4, 4]  # the run's, not the bench default 8
    assert len(report["step_ms_per_rank"]) == 2
    alone, ddp = zip(*report["step_ms_per_rank"])
    assert report["exposed_comm_ms"] == pytest.approx(sum(d - a for a, d in zip(alone, ddp)) / 2)
    assert report["allreduce_mib_per_step"] > 1  # a ResNet-18 and its projector in fp32
    assert all(r["device"]["kinds"]["convolution"] > 0 for r in report["results"])
    assert "Device work by kind" in outs[0][0]


def test_step_bench_fp16_on_a_cpu_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    from mveb.cli import main

    assert main(["bench", "step", "--device", "cpu", "--fp16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fp16" in err and "Traceback" not in err


def test_step_bench_keeps_each_variant_in_its_json_as_it_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU host's time limit may cut a run with compiled variants: the JSON holds every variant
    that ended, with the ratios whose baselines have run, and the table prints from it."""
    import mveb.bench_step as bench_module

    written: list[dict] = []
    write = bench_module.write_atomic

    def keep(path: Path, text: str) -> None:
        written.append(json.loads(text))
        write(path, text)

    monkeypatch.setattr(bench_module, "write_atomic", keep)
    out = tmp_path / "step.json"
    report = bench_step("cpu", batch_size=4, steps=2, json_path=out)
    assert [[r["variant"] for r in w["results"]] for w in written] == [["official-style"], ["official-style", "mveb"]]
    first = written[0]["results"][0]
    assert first["samples_per_s"] > 0 and "ratio_to_mveb_synthetic" not in first  # its baseline had not run
    assert "| official-style | 4 |" in format_table(written[0])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))


def test_step_bench_under_torchrun_refuses_what_it_does_not_time(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from mveb.cli import main

    monkeypatch.setenv("RANK", "0")  # as torchrun sets them; the check comes before any rendezvous
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["bench", "step", "--device", "cpu", "--priority-stream"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--priority-stream" in err
    for flag, value in (("--batch-size", "0"), ("--steps", "0")):
        assert main(["bench", "step", "--device", "cpu", flag, value]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{flag} must be at least" in err


def test_step_bench_applies_config_overrides_to_every_variant(capsys: pytest.CaptureFixture[str]) -> None:
    """--set KEY=VALUE reaches every variant's trainer (a 64-wide projector here), is kept in the
    report, and a bad key is a one-line error."""
    from mveb.cli import main

    report = bench_step("cpu", batch_size=4, steps=2, overrides=("model.proj_dim=64", "model.proj_hidden=128"))
    assert report["overrides"] == ["model.proj_dim=64", "model.proj_hidden=128"]
    projector = (128 * 512 + 128 * 128 + 64 * 128 + 64 + 4 * 128) * 4 / 2**20  # linears + BN, fp32 MiB
    backbone = 11176512 * 4 / 2**20  # torchvision resnet18 without its classifier
    assert all(r["grad_mib"] == pytest.approx(backbone + projector) for r in report["results"])
    capsys.readouterr()
    assert main(["bench", "step", "--device", "cpu", "--set", "model.no_such_key=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no_such_key" in err


def test_step_bench_that_measures_nothing_exits_1_with_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A step that fails in every variant (here a stand-in for, e.g., a Triton loss on a CPU)
    once ended in a traceback with no table, or exited 0 when the failing rows were not the
    baseline: the table prints, the exit code says nothing was measured, and stderr says why."""
    from mveb.cli import main
    from train.step import Trainer

    def fail(self: Trainer, batch: object, step: int) -> None:
        raise RuntimeError("the loss needs CUDA tensors\nand more detail on a second line")

    monkeypatch.setattr(Trainer, "step", fail)
    out = tmp_path / "step.json"
    assert main(["bench", "step", "--device", "cpu", "--batch-size", "2", "--steps", "1", "--json", str(out)]) == 1
    captured = capsys.readouterr()
    assert "| official-style | 2 | failed: RuntimeError: the loss needs CUDA tensors |" in captured.out
    assert "| mveb | 2 | failed: RuntimeError: the loss needs CUDA tensors |" in captured.out
    assert captured.err.splitlines()[-1] == ("mveb bench step: nothing measured: official-style, mveb: "
                                             "RuntimeError: the loss needs CUDA tensors")
    assert [r["variant"] for r in json.loads(out.read_text())["results"]] == ["official-style", "mveb"]


def test_step_bench_loader_failing_in_its_workers_is_a_one_line_note(photo_train: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """An error in a loader's worker reaches the step as DataLoader's "Caught ValueError in
    DataLoader worker process 0." with the worker's traceback: the row says the worker's own
    error, and the synthetic step measured keeps the exit code 0."""
    from mveb.cli import main
    from pipeline.torch_loader import MultiCropAugment

    def fail(self: MultiCropAugment, img: object, rng: object) -> None:
        raise ValueError("views of an unexpected size")

    monkeypatch.setattr(MultiCropAugment, "__call__", fail)  # before the workers fork: they inherit it
    out = tmp_path / "step.json"
    assert main(["bench", "step", "--device", "cpu", "--batch-size", "2", "--steps", "1", "--no-official",
                 "--loader", "synthetic,torch", "--data", str(photo_train), "--set", "data.workers=1",
                 "--json", str(out)]) == 0
    assert "| mveb torch | 2 | failed: ValueError: views of an unexpected size |" in capsys.readouterr().out
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["mveb"]["samples_per_s"] > 0 and rows["mveb torch"]["error"] == "ValueError: views of an unexpected size"


@pytest.mark.parametrize("option", ["--json", "--trace"])
def test_step_bench_unwritable_json_or_trace_is_refused_before_measuring(
        option: str, unwritable: Callable[[str], Path], calls: Callable[[object, str], list],
        capsys: pytest.CaptureFixture[str]) -> None:
    """Either once failed only after the step was timed: --json after the first variant,
    --trace in every variant (a traceback, as the baseline's failure propagated)."""
    import mveb.bench_step as bench_module
    from mveb.cli import main

    path = unwritable("out")
    timed = calls(bench_module, "run_variant")
    assert main(["bench", "step", "--device", "cpu", "--batch-size", "2", "--steps", "1", "--no-official",
                 option, str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mveb bench: error: {option} {path}"), err
    assert timed == []


def test_bench_all_that_measures_nothing_exits_1_with_why(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Every part run failing once exited 0; the summary is still written."""
    from mveb.cli import main

    data, out = tmp_path / "broken", tmp_path / "bench"
    (data / "a").mkdir(parents=True)
    for i in range(40):  # more than a batch: each backend fails on decoding, not on the count
        (data / "a" / f"{i}.jpg").write_bytes(b"not a jpeg")
    assert main(["bench", "all", "--device", "cpu", "--out", str(out), "--parts", "loader",
                 "--data", str(data)]) == 1
    why = capsys.readouterr().err.splitlines()[-1]
    assert why.startswith("mveb bench all: nothing measured: loader: ") and "decoded" in why, why
    assert (out / "summary.md").read_text().count("`mveb validate`") == 3  # a row per backend


def test_bench_all_with_a_missing_data_folder_is_one_line_before_any_part(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """It once ran the kernels part, failed the loader and step parts on it, and exited 0 (the
    kernels measured) where a usage error exits 2."""
    from mveb.cli import main

    assert main(["bench", "all", "--device", "cpu", "--out", str(tmp_path / "bench"), "--data",
                 str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err == (f"mveb bench: error: {tmp_path / 'none'} does not exist; pass an ImageFolder "
                                       "root (one subfolder per class)\n")
    assert not (tmp_path / "bench").exists()


def test_bench_all_unwritable_out_is_one_line_before_any_part(unwritable: Callable[[str], Path],
                                                              calls: Callable[[object, str], list],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    import mveb.bench_all as bench_module
    from mveb.cli import main

    out = unwritable("bench")
    ran = calls(bench_module, "_part")
    assert main(["bench", "all", "--device", "cpu", "--out", str(out), "--parts", "kernels"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mveb bench: error: --out {out}"), err
    assert ran == []


def test_bench_all_read_only_out_folder_is_one_line_before_any_part(tmp_path: Path, unprivileged: list[str]) -> None:
    """A folder the user may not write to once failed only after the kernels part ran."""
    import subprocess
    import sys

    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    r = subprocess.run([*unprivileged, sys.executable, "-m", "mveb", "bench", "all", "--device", "cpu", "--out",
                        str(ro), "--parts", "kernels"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"mveb bench: error: --out {ro}: cannot write in {ro} (Permission denied)"
    assert "== bench" not in r.stdout and not list(ro.iterdir())
