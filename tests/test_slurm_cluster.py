"""slurm/launch.py on the real local cluster (slurm/cluster/up.sh): the demo config trained by
2 nodes x 2 CPU tasks over gloo, a run that a signal requeues and that resumes from its
checkpoint (and that a plain scancel then stops for good), a validate job that a signal requeues
mid-scan and that resumes its scan, a shard build as a CPU job, the DDP step benchmark over
2 nodes, and a run that its real time limit requeues.

The jobs are submitted together (the cluster runs them side by side) and each test
waits for its own: most of a job's time here is Python start-up, which overlaps well.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from slurm.launch import main
from train.checkpoint import checkpoint_dir, latest_checkpoint, load_checkpoint

pytestmark = pytest.mark.slurm

# The demo preset, shrunk so that a step takes a second or two on 2 shared cores.
TINY = ["data.batch_size=4", "data.workers=0", "data.n_local=0", "run.progress=false", "run.tensorboard=false"]
REQUEUE_STEPS = 200  # never reached: the test stops the run
TIMEOUT_S = 240
TIME_LIMIT_MIN = 5  # the shortest launch.py accepts: SLURM's warning signal comes after about 3 minutes


def _launch(run: Path, photo_train: Path, nodes: int, tasks: int, steps: int, time_min: int = 10) -> str:
    assert main(["--nodes", str(nodes), "--gpus-per-node", "0", "--tasks-per-node", str(tasks), "--cpus-per-task", "1",
                 "--time", str(time_min), "--config", "demo", "--data", str(photo_train), "--out", str(run),
                 f"schedule.steps={steps}", *TINY]) == 0
    return json.loads((run / "launch.json").read_text())["job_id"]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory, photo_train: Path) -> Iterator[dict[str, tuple[Path, str]]]:
    """name -> (submitit folder, job id) of the jobs submitted at once."""
    root = tmp_path_factory.mktemp("slurm")
    submitted = {"train": (root / "train", _launch(root / "train", photo_train, nodes=2, tasks=2, steps=2)),
                 "requeue": (root / "requeue", _launch(root / "requeue", photo_train, nodes=2, tasks=1,
                                                       steps=REQUEUE_STEPS)),
                 # Far more steps than fit before its time limit, so that only the limit stops it.
                 "time_limit": (root / "time_limit", _launch(root / "time_limit", photo_train, nodes=1, tasks=1,
                                                             steps=100 * REQUEUE_STEPS, time_min=TIME_LIMIT_MIN))}
    beton = root / "shards" / "train.beton"
    assert main(["shards", "--src", str(photo_train), "--out", str(beton), "--limit", "12", "--cpus-per-task", "1",
                 "--time", "10"]) == 0
    folder = beton.parent / f"{beton.name}.submitit"
    out = {name: (run / "submitit", job_id) for name, (run, job_id) in submitted.items()}
    out["shards"] = (folder, next(folder.glob("*_submitted.pkl")).name.split("_")[0])
    checked = root / "validate" / "train"
    shutil.copytree(photo_train / "china", checked / "china")
    (checked / "china" / "broken.jpg").write_bytes(b"not a jpeg")
    assert main(["validate", "--src", str(checked), "--cpus-per-task", "1", "--time", "10"]) == 0
    folder = checked.parent / "train.validate.submitit"
    out["validate"] = (folder, next(folder.glob("*_submitted.pkl")).name.split("_")[0])
    out["validate_requeue"] = _launch_slow_validate(root / "requeue_validate")
    bench = root / "bench"
    assert main(["bench", "--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "10",
                 "--batch-size", "4", "--steps", "2", "--profile", "--out", str(bench)]) == 0
    out["bench"] = (bench / "submitit", next((bench / "submitit").glob("*_submitted.pkl")).name.split("_")[0])
    yield out
    subprocess.run(["scancel", *(job_id for _, job_id in out.values())], capture_output=True)


SLOW_IMAGES = 300


def _launch_slow_validate(root: Path) -> tuple[Path, str]:
    """A validate job slow enough to be signalled mid-scan: one 3000 px JPEG (about 60 ms to
    decode here) under SLOW_IMAGES hard links, so it costs no disk."""
    from PIL import Image

    src = root / "train"
    (src / "a").mkdir(parents=True)
    big = root / "big.jpg"
    Image.linear_gradient("L").resize((3000, 3000)).convert("RGB").save(big, quality=95)
    for i in range(SLOW_IMAGES):
        os.link(big, src / "a" / f"{i}.jpg")
    assert main(["validate", "--src", str(src), "--cpus-per-task", "1", "--time", "10"]) == 0
    folder = root / "train.validate.submitit"
    return folder, next(folder.glob("*_submitted.pkl")).name.split("_")[0]


def _in_queue(job_id: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return bool(out.stdout.strip())


def _wait(what: str, ready: Callable[[], bool], folder: Path, job_id: str, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            logs = "\n".join(p.read_text()[-2000:] for p in sorted(folder.glob(f"{job_id}_*_log.err")))
            pytest.fail(f"job {job_id}: {what} not seen within {timeout_s:.0f} s; logs:\n{logs}")
        time.sleep(0.5)


def _results(folder: Path, job_id: str, tasks: int) -> list[dict[str, Any]]:
    """Each task's return value, once the job left the queue (a requeued job goes back to it)."""
    paths = [folder / f"{job_id}_{t}_result.pkl" for t in range(tasks)]
    _wait("every task's result", lambda: all(p.exists() for p in paths) and not _in_queue(job_id), folder, job_id)
    results = []
    for p in paths:
        status, value = pickle.loads(p.read_bytes())
        assert status == "success", value
        results.append(value)
    return results


def _load(checkpoint: Path | None) -> dict[str, Any]:
    assert checkpoint is not None, "no checkpoint written"
    return load_checkpoint(checkpoint)


def _metrics(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_a_validate_job_signalled_mid_scan_is_requeued_and_resumes_its_scan(
        jobs: dict[str, tuple[Path, str]]) -> None:
    """First in this file: its job must still be scanning when the signal comes."""
    from pipeline.validate import ScanJournal

    folder, job_id = jobs["validate_requeue"]
    journal = ScanJournal(folder.parent / "train").path
    _wait("the scan's journal", lambda: journal.exists() and journal.stat().st_size > 0, folder, job_id)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    (summary,) = _results(folder, job_id, tasks=1)
    assert (summary["decodable"], summary["broken"]) == (SLOW_IMAGES, 0)
    assert 0 < summary["resumed"] < SLOW_IMAGES, "the requeued job decoded everything again"
    assert (folder / f"{job_id}_0_log.out").read_text().count("Starting with JobEnvironment") == 2
    assert not journal.exists()


@pytest.mark.slow
def test_usr2_requeues_and_resumes_then_scancel_stops_for_good(jobs: dict[str, tuple[Path, str]]) -> None:
    folder, job_id = jobs["requeue"]
    run = folder.parent
    log = folder / f"{job_id}_0_log.err"
    _wait("step 2", lambda: len(_metrics(run)) >= 2, folder, job_id)
    # What SLURM sends before a time limit (submitit's job._interrupt() sends SIGTERM then this).
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    _wait("the requeued job resuming", lambda: "resuming from" in log.read_text(), folder, job_id)
    text = log.read_text()
    stop_step = int(re.search(r"checkpoint saved at step (\d+); requeueing", text)[1])
    assert stop_step >= 2, "interrupted mid-run"
    first, resume_step = re.search(r"resuming from (\S+) \(step (\d+)\)", text).groups()
    assert int(resume_step) == stop_step, "resumed where it stopped, not from step 0"
    assert Path(first).parent == checkpoint_dir(run)

    _wait("a step after the resume", lambda: len(_metrics(run)) > stop_step, folder, job_id)
    subprocess.run(["scancel", job_id], check=True)  # a user's cancel: save, and stay cancelled
    rank0, rank1 = _results(folder, job_id, tasks=2)
    assert rank0["preempted"] and rank1["preempted"]
    assert stop_step < rank0["step"] == rank1["step"] < REQUEUE_STEPS
    assert rank0["resumed_from"] == first
    assert _load(latest_checkpoint(run))["step"] == rank0["step"], "scancel saved where it stopped"
    starts = (folder / f"{job_id}_0_log.out").read_text().count("Starting with JobEnvironment")
    assert starts == 2, "requeued once after USR2, not after scancel"
    assert [m["step"] for m in _metrics(run)] == list(range(1, rank0["step"] + 1))


@pytest.mark.slow
def test_two_nodes_two_tasks_train_the_demo_config(jobs: dict[str, tuple[Path, str]]) -> None:
    folder, job_id = jobs["train"]
    run = folder.parent
    results = _results(folder, job_id, tasks=4)

    assert [(r["rank"], r["step"]) for r in results] == [(0, 2), (1, 2), (2, 2), (3, 2)]
    # Each rank returns the loss all-reduced over the world, the one rank 0 logged.
    logged = _metrics(run)[-1]
    assert logged["step"] == 2 and logged["samples_per_s"] > 0
    assert [r["loss"] for r in results] == [pytest.approx(logged["loss"], rel=1e-6)] * 4
    checkpoint = _load(latest_checkpoint(run))
    assert checkpoint["step"] == 2 and checkpoint["world_size"] == 4 and len(checkpoint["ranks"]) == 4
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["batch_size"] == 4 and config["run"]["out"] == str(run)
    launch = json.loads((run / "launch.json").read_text())
    assert (launch["world_size"], launch["global_batch"]) == (4, 16)


@pytest.mark.slow
def test_shards_runs_as_a_cpu_job(jobs: dict[str, tuple[Path, str]]) -> None:
    from pipeline.shards import check_beton

    folder, job_id = jobs["shards"]
    (report,) = _results(folder, job_id, tasks=1)
    assert report["written"] == 12 and report["workers"] == 1
    beton = folder.parent / "train.beton"
    assert json.loads(Path(f"{beton}.report.json").read_text())["written"] == 12
    check_beton(beton)


@pytest.mark.slow
def test_validate_runs_as_a_cpu_job(jobs: dict[str, tuple[Path, str]]) -> None:
    folder, job_id = jobs["validate"]
    (summary,) = _results(folder, job_id, tasks=1)
    assert summary["broken"] == 1 and summary["decodable"] > 0
    report = json.loads((folder.parent / "train.validate.json").read_text())
    assert [Path(b["path"]).name for b in report["bad"]] == ["broken.jpg"]


@pytest.mark.slow
def test_bench_job_reports_what_ddp_costs_over_two_nodes(jobs: dict[str, tuple[Path, str]]) -> None:
    folder, job_id = jobs["bench"]
    rank0, rank1 = _results(folder, job_id, tasks=2)
    assert rank1 is None and rank0["world_size"] == 2 and rank0["backend"] == "gloo"
    assert [r["variant"] for r in rank0["results"]] == ["mveb, one process", "mveb, DDP x 2"]
    assert all(r["device"]["kinds"]["convolution"] > 0 for r in rank0["results"])
    assert json.loads((folder.parent / "bench.json").read_text()) == rank0


def test_refused_submission_is_one_line(tmp_path: Path, photo_train: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--gpus-per-node", "0", "--partition", "no-such-partition", "--config", "demo",
                 "--data", str(photo_train), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == ["python slurm/launch.py: error: sbatch refused the job: "
                                "Batch job submission failed: Invalid partition name specified"]
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.slow
def test_the_time_limit_and_scontrol_requeue_both_resume(jobs: dict[str, tuple[Path, str]]) -> None:
    """SLURM's own warning before the time limit (`--signal=USR2@120`), with no signal from the
    test: the job checkpoints, submitit counts a timeout (of the 100 allowed) and requeues it, and
    the run resumes where it stopped; then SLURM's own requeue, which it resumes from as well.
    Last in this file: it waits out most of the limit."""
    folder, job_id = jobs["time_limit"]
    run = folder.parent
    log = folder / f"{job_id}_0_log.err"
    _wait("the job resuming after its time limit", lambda: log.exists() and "resuming from" in log.read_text(),
          folder, job_id, timeout_s=TIME_LIMIT_MIN * 60 + TIMEOUT_S)
    text = log.read_text()
    assert "Caught signal SIGUSR2" in text and "this job is timed-out" in text
    stop_step = int(re.search(r"checkpoint saved at step (\d+); requeueing", text)[1])
    assert stop_step >= 1 and int(re.search(r"resuming from \S+ \(step (\d+)\)", text)[1]) == stop_step
    _wait("a step after the resume", lambda: len(_metrics(run)) > stop_step, folder, job_id)

    # SLURM's own requeue (a node failure, PreemptMode=REQUEUE, an admin): SIGTERM, then the job
    # runs again; the trainer saves and leaves the requeue to SLURM.
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    _wait("the job resuming after scontrol requeue", lambda: log.read_text().count("resuming from") == 2,
          folder, job_id)
    term_step = int(re.findall(r"stopped at step (\d+) on a signal", log.read_text())[-1])
    assert term_step > stop_step
    assert int(re.findall(r"resuming from \S+ \(step (\d+)\)", log.read_text())[-1]) == term_step
    _wait("a step after the second resume", lambda: len(_metrics(run)) > term_step, folder, job_id)
    subprocess.run(["scancel", job_id], check=True)
    (result,) = _results(folder, job_id, tasks=1)
    assert term_step < result["step"] < 100 * REQUEUE_STEPS
    assert (folder / f"{job_id}_0_log.out").read_text().count("Starting with JobEnvironment") == 3
    assert [m["step"] for m in _metrics(run)] == list(range(1, result["step"] + 1))
