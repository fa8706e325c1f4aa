"""slurm/launch.py without a cluster: the --dry-run script and plan, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.validate import kept_report
from slurm.launch import main
from slurm.plan import parse_time

LAUNCH = [sys.executable, "slurm/launch.py"]


def test_dry_run_four_nodes_shows_the_paper_setup(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = subprocess.run(LAUNCH + ["--nodes", "4", "--dry-run", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for flag in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10",
                 "--time=4320", "--signal=USR2@120", "--requeue"):
        assert f"#SBATCH {flag}" in lines, flag
    assert "world size 32" in r.stdout
    assert "global batch 4096" in r.stdout
    assert "lr: 0.3 x 4096 / 256 = 4.8" in lines
    assert any(line.startswith("srun ") and "submitit.core._submit" in line for line in lines)
    assert not out.exists(), "a dry run must not create the run folder"


def test_dry_run_scales_batch_and_lr(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--nodes", "2", "--gpus-per-node", "4", "--batch-size", "1024", "--time", "1-00:00:00",
                 "--partition", "gpu", "--account", "vision", "--qos", "high", "--mem", "480G",
                 "--constraint", "volta32gb", "--exclude", "node7", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "batch: 128 per task x 8 = global batch 1024" in out
    assert "lr: 0.3 x 1024 / 256 = 1.2" in out
    for flag in ("--time=1440", "--partition=gpu", "--account=vision", "--qos=high", "--mem=480G",
                 "--constraint=volta32gb", "--exclude=node7", "--ntasks-per-node=4"):
        assert f"#SBATCH {flag}\n" in out, flag


def test_dry_run_cpu_tasks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "2", "--batch-per-gpu", "16",
                 "--config", "demo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --ntasks-per-node=2\n" in out
    assert "--gpus-per-node" not in out
    assert "global batch 64" in out


def test_dry_run_from_a_runs_config_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run's saved config resubmits it: its data, folder and settings, named after the folder."""
    from train.config import get_config

    run = tmp_path / "rn50_long"
    run.mkdir()
    cfg = get_config("demo", [f"data.path={tmp_path}", f"run.out={run}", "optim.base_lr=0.6"])
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert main(["--gpus-per-node", "0", "--tasks-per-node", "2", "--config", str(run / "config.json"),
                 "schedule.epochs=50", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --job-name=mveb-rn50_long\n" in out and f"run folder: {run}" in out
    assert "lr: 0.6 x 64 / 256 = 0.15" in out


def test_batch_flags_replace_a_runs_saved_global_batch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from train.config import get_config

    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(get_config("demo", ["data.global_batch_size=64"]).to_dict()))
    argv = ["--gpus-per-node", "0", "--tasks-per-node", "2", "--config", str(saved), "--dry-run"]
    for flag, plan in ((["--batch-per-gpu", "8"], "8 per task x 2 = global batch 16"),
                       (["--batch-size", "20"], "10 per task x 2 = global batch 20"),
                       ([], "32 per task x 2 = global batch 64")):
        assert main(argv + flag) == 0
        assert f"batch: {plan}\n" in capsys.readouterr().out, flag


def test_dry_run_shards_is_one_cpu_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["shards", "--src", str(tmp_path), "--out", str(tmp_path / "train.beton"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for flag in ("--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=32"):
        assert f"#SBATCH {flag}\n" in out, flag
    assert "--gpus-per-node" not in out


def test_dry_run_validate_is_one_cpu_task_writing_beside_the_folder(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--src", str(tmp_path / "train"), "--cpus-per-task", "16", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for flag in ("--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=16", "--time=240"):
        assert f"#SBATCH {flag}\n" in out, flag
    assert f"validate: {tmp_path / 'train'} -> {tmp_path / 'train.validate.json'}" in out


def test_validate_of_a_read_only_dataset_keeps_its_report_where_dali_reads_it(
        photo_train: Path, small_disk: Callable[[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    """The job's report and its submitit folder go to the cache, which the DALI loader reads,
    instead of asking for a --report that no loader would ever look at."""
    disk = small_disk("20m")
    src = disk / "train"
    shutil.copytree(photo_train / "china", src / "china")
    (src / "china" / "broken.jpg").write_bytes(b"not a jpeg")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    assert main(["validate", "--src", str(src), "--cpus-per-task", "1", "--local"]) == 0
    assert "the report is kept in the cache instead" in capsys.readouterr().out
    report = json.loads(kept_report(src).read_text())
    assert [Path(b["path"]).name for b in report["bad"]] == ["broken.jpg"]


def test_dry_run_bench_is_one_task_per_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--nodes", "4", "--out", str(tmp_path / "b"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "world size 32" in out and f"report (when done): {tmp_path / 'b' / 'bench.json'}" in out
    for flag in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8"):
        assert f"#SBATCH {flag}\n" in out, flag


def test_bench_needs_two_tasks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--gpus-per-node", "0", "--out", str(tmp_path / "b")]) == 2
    assert "the DDP cost needs 2 tasks or more" in capsys.readouterr().err.strip().splitlines()[-1]


def test_shortest_time_limit_is_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--time", "4:01", "--dry-run"]) == 0  # 4 min 1 s, rounded up
    assert "#SBATCH --time=5\n" in capsys.readouterr().out


@pytest.mark.parametrize("text, minutes", [("72:00:00", 4320), ("90", 90), ("1-12", 2160), ("0:30", 1),
                                           ("1:30:01", 91), ("2-00:30:00", 2910)])
def test_parse_time(text: str, minutes: int) -> None:
    assert parse_time(text) == minutes


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert "submitted" not in captured.out
    return err


@pytest.mark.parametrize("argv, expect", [
    (["--nodes", "0"], "--nodes must be at least 1"),
    (["--nodes", "4", "--batch-size", "1000"], "not divisible by the world size 32"),
    (["--gpus-per-node", "8", "--tasks-per-node", "2"], "one task runs per GPU"),
    (["--time", "soon"], "--time 'soon'"),
    # SLURM signalled such a job during its start-up, and it was requeued with no progress, again and again.
    (["--time", "2"], "--time of 2 min is too short: SLURM's warning signal comes 120 s before the limit"),
    (["--time", "4"], "ask for at least 5 minutes"),
    (["--config", "nope"], "unknown config preset"),
    (["--nodes", "2", "--local", "--gpus-per-node", "0", "--data", "."], "--local runs on this machine only"),
])
def test_bad_input_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str],
                               expect: str) -> None:
    out = tmp_path / "run"
    assert expect in _one_line_error(capsys, argv + ["--out", str(out)])
    assert not (out / "submitit").exists()


def test_missing_data_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = _one_line_error(capsys, ["--gpus-per-node", "0", "--config", "demo", "--data", str(tmp_path / "nope"),
                                   "--out", str(tmp_path / "run")])
    assert "does not exist" in err
    assert not (tmp_path / "run").exists()


def test_no_sbatch_suggests_local_or_dry_run(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch, photo_train: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without sbatch
    err = _one_line_error(capsys, ["--gpus-per-node", "0", "--config", "demo", "--data", str(photo_train),
                                   "--out", str(tmp_path / "run")])
    assert "sbatch not found" in err and "--local" in err and "--dry-run" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("missing, overrides, expect", [
    (True, [], "does not exist"),
    (False, ["optim.base_lr=nan"], "optim.base_lr=nan; it must be a positive number"),
    (False, ["run.log_every_steps=0"], "run.log_every_steps=0; it must be at least 1"),
    # The flag once won silently (and under `mveb pretrain` the override did).
    (False, ["run.out=elsewhere"], "--out and run.out=elsewhere both set run.out; give one"),
    (False, ["--batch-per-gpu", "4", "data.batch_size=8"], "--batch-per-gpu and data.batch_size=8 both set"),
    (False, ["optim.base_lr=0.1", "--nodes", "1", "run.log_every_steps=0"], "run.log_every_steps=0; it must be"),
])
def test_dry_run_with_data_checks_the_config(capsys: pytest.CaptureFixture[str], tmp_path: Path, photo_train: Path,
                                             missing: bool, overrides: list[str], expect: str) -> None:
    """A dry run fails as the submission would, instead of the job failing once it runs."""
    data = tmp_path / "nope" if missing else photo_train
    err = _one_line_error(capsys, ["--gpus-per-node", "0", "--config", "demo", "--data", str(data),
                                   "--out", str(tmp_path / "run"), "--dry-run", *overrides])
    assert expect in err


def test_dry_run_with_data_checks_the_run_folder_can_be_written(capsys: pytest.CaptureFixture[str], photo_train: Path,
                                                                unwritable: Callable[[str], Path]) -> None:
    """A dry run once printed the plan for a run folder the job could never create."""
    out = unwritable("run")
    err = _one_line_error(capsys, ["--gpus-per-node", "0", "--config", "demo", "--data", str(photo_train),
                                   "--out", str(out), "--dry-run"])
    assert err.startswith(f"python slurm/launch.py: error: --out {out}: "), err


@pytest.mark.parametrize("dry_run", [["--dry-run"], []], ids=["dry-run", "submit"])
@pytest.mark.parametrize("argv, expect", [
    (["shards", "--max-res", "0"], "--max-res must be at least 8, got 0"),
    (["shards", "--quality", "200"], "--quality must be in 1..100, got 200"),
    (["shards", "--timeout", "0"], "--timeout must be a positive number of seconds"),
    (["shards", "--workers", "0"], "--workers must be at least 1"),
    (["validate", "--workers", "0"], "--workers must be at least 1"),
    (["bench", "--batch-size", "0"], "--batch-size must be at least 2"),
    (["bench", "--batch-size", "1"], "--batch-size must be at least 2"),
    (["bench", "--steps", "0"], "--steps must be at least 1, got 0"),
    # Each once failed only in the job, after the queue (validate after its whole scan).
    (["shards", "--out", "/proc/mveb-test/x.beton"], "--out /proc/mveb-test/x.beton: cannot write in /proc"),
    (["validate", "--report", "/proc/mveb-test/r.json"], "--report /proc/mveb-test/r.json: cannot write in /proc"),
    (["validate", "--fix-list", "/proc/mveb-test/f.txt"], "--fix-list /proc/mveb-test/f.txt: cannot write in /proc"),
    (["bench", "--out", "/proc/mveb-test/b"], "--out /proc/mveb-test/b: cannot write in /proc"),
    (["shards", "--time", "3"], "--time of 3 min is too short"),
    (["validate", "--time", "1"], "--time of 1 min is too short"),
    (["bench", "--time", "00:02:00"], "--time of 2 min is too short"),
])
def test_job_options_are_checked_before_submitting(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, argv: list[str], expect: str,
                                                   dry_run: list[str]) -> None:
    """The options the job would reject only once it runs (on a cluster: after the queue)."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch: a submission that got this far says so instead
    src = tmp_path / "train"
    src.mkdir()
    where = {"shards": ["--src", str(src), "--out", str(tmp_path / "x.beton")],
             "validate": ["--src", str(src)],
             "bench": ["--gpus-per-node", "0", "--tasks-per-node", "2", "--out", str(tmp_path / "b")]}[argv[0]]
    assert expect in _one_line_error(capsys, [argv[0], *where, *argv[1:], *dry_run])  # argv's --out wins
    assert not list(tmp_path.glob("*.submitit")) and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_local_job_failure_is_one_line(tmp_path: Path) -> None:
    """--local says what the job itself said, in one line, with the exit code the CLI would give."""
    src = tmp_path / "not_images"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        for i in range(4):
            (src / c / f"{i}.jpg").write_text(f"not a jpeg {i}")
    run = tmp_path / "run"
    r = subprocess.run(LAUNCH + ["--local", "--gpus-per-node", "0", "--tasks-per-node", "1", "--config", "demo",
                                 "--data", str(src), "--out", str(run), "data.batch_size=4", "schedule.steps=3",
                                 "data.workers=0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    [log] = run.glob("submitit/*_0_log.err")
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("python slurm/launch.py: error: the job failed: UsageError: none of the 8 images "
                           "can be decoded"), line
    assert line.endswith(f"; full log: {log}"), line
    assert "mveb.errors.UsageError: none of the 8 images" in log.read_text()  # the traceback is kept there


def test_script_exit_code_and_no_traceback() -> None:
    r = subprocess.run(LAUNCH + ["--nodes", "0"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["python slurm/launch.py: error: --nodes must be at least 1, got 0"]


@pytest.mark.gpu
@pytest.mark.slow
def test_local_gpu_run_trains_on_cuda(tmp_path: Path, photo_train: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--local on a GPU host: submitit's LocalExecutor, one task on GPU 0, the demo config."""
    run = tmp_path / "run"
    assert main(["--local", "--gpus-per-node", "1", "--config", "demo", "--data", str(photo_train), "--out", str(run),
                 "schedule.steps=3", "run.progress=false"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert result["step"] == 3 and not result["preempted"]
    assert (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir())
    log = next((run / "submitit").glob("*_0_log.out")).read_text()
    assert "Job completed successfully" in log


def test_rendezvous_from_a_slurm_task_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from slurm.job import rendezvous_from_submitit

    for name, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "1234", "SLURM_NTASKS": "16",
                        "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_PROCID": "11", "SLURM_LOCALID": "3",
                        "SLURM_JOB_NODELIST": "gpu[07-08]"}.items():
        monkeypatch.setenv(name, value)
    assert rendezvous_from_submitit() == {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3",
                                          "MASTER_ADDR": "gpu07", "MASTER_PORT": "21234"}


def test_validate_and_shard_jobs_are_requeued_at_a_time_limit(tmp_path: Path, photo_train: Path) -> None:
    """submitit ends a plain function's job at its time limit ("timed-out and not
    checkpointable"); the job it requeues instead runs the same call again, whose scan resumes."""
    import pickle

    from slurm.job import CpuJob, validate_job

    job = CpuJob(validate_job, str(photo_train), str(tmp_path / "r.json"), None, 1)
    again = pickle.loads(pickle.dumps(job.checkpoint()))  # what submitit writes for the requeued job
    assert again.result()["decodable"] == 288
    assert json.loads((tmp_path / "r.json").read_text())["good"] == 288
