"""The pretraining loop end to end on a tiny real-photo set: resume, preemption, CLI, loaders, errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch

from mveb.cli import main
from mveb.errors import UsageError
from pipeline.demo_photos import build_photo_folder
from train.checkpoint import latest_checkpoint, load_checkpoint
from train.config import check_config, get_config
from train.distributed import DistInfo
from train.pretrain import pretrain
from train.report import render_report
from train.step import Trainer

# 16 photos, batch 4: 4 steps per epoch, 12 in the schedule (1 warmup epoch).
TINY = ["data.batch_size=4", "data.workers=0", "data.global_size=32", "data.local_size=16",
        "model.proj_hidden=64", "model.proj_dim=32", "schedule.epochs=3", "schedule.warmup_epochs=1",
        "run.log_every_steps=1", "run.progress=false", "run.checkpoint_every_steps=100"]
STEPS = 6  # crosses an epoch boundary


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tiny model gains nothing from a second thread, and two OpenMP threads on a busy
    # 2-core machine spin against each other (measured 5-10x slower steps).
    # OMP_NUM_THREADS also keeps pretrain() from choosing its own count (cores - workers).
    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(before)
    if env is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="session")
def tiny_train(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_photo_folder(tmp_path_factory.mktemp("tiny"), per_class_train=4, per_class_val=1, side=48,
                              classes=4) / "train"


def _cfg(data: Path, out: Path, *extra: str):
    return get_config("demo", TINY + [f"data.path={data}", f"run.out={out}", *extra])


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tiny_train: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted")
    summary = pretrain(_cfg(tiny_train, run, f"schedule.steps={STEPS}"))
    assert summary["step"] == STEPS and not summary["preempted"]
    return run


def _assert_same_run(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["lr"] == rb["lr"] and ra["momentum"] == rb["momentum"], ra["step"]
        assert ra["epoch"] == rb["epoch"]
        # Same weights, optimizer state and batches: the same loss up to float noise.
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-3, abs=1e-4), ra["step"]


def test_uninterrupted_run_logs_every_step(uninterrupted: Path) -> None:
    records = _metrics(uninterrupted)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    keys = {"step", "epoch", "loss", "align", "entropy", "lr", "momentum", "samples_per_s", "data_wait_fraction",
            "skipped_steps"}
    assert keys <= set(records[0])
    assert all(math.isfinite(r["loss"]) and r["samples_per_s"] > 0 and 0 <= r["data_wait_fraction"] < 1
               for r in records)
    assert records[0]["momentum"] == pytest.approx(0.996) and records[-1]["momentum"] > records[0]["momentum"]
    assert json.loads((uninterrupted / "config.json").read_text())["model"]["arch"] == "resnet18"
    assert any((uninterrupted / "tensorboard").iterdir())
    state = load_checkpoint(latest_checkpoint(uninterrupted))
    assert state["step"] == STEPS and state["epoch"] == 1
    assert {"model", "momentum", "optimizer", "scaler", "loader", "rng", "config"} <= set(state)
    assert all(k.startswith(("backbone.", "projector.")) for k in state["model"])


@pytest.mark.slow
def test_sigterm_then_resume_matches_uninterrupted(uninterrupted: Path, tiny_train: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    # One DataLoader worker process: SLURM signals the whole process group, workers included.
    cmd = [sys.executable, "-m", "mveb", "pretrain", "--config", "demo", "--data", str(tiny_train), "--out", str(run),
           "--steps", str(STEPS), *TINY, "data.workers=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").exists() and len(_metrics(run)) >= 2):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never reached step 2"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "preempted" in out
    stopped = load_checkpoint(latest_checkpoint(run))["step"]
    assert 2 <= stopped < STEPS  # saved at a step boundary, before the end

    summary = pretrain(_cfg(tiny_train, run, f"schedule.steps={STEPS}"))
    assert summary["step"] == STEPS and summary["resumed_from"].endswith(f"step_{stopped:08d}.pt")
    _assert_same_run(_metrics(uninterrupted), _metrics(run))
    a, b = (load_checkpoint(latest_checkpoint(r)) for r in (uninterrupted, run))
    assert a["loader"] == b["loader"] and a["epoch"] == b["epoch"]


def test_cli_steps_2_then_3_continues(uninterrupted: Path, tiny_train: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    args = ["pretrain", "--config", "demo", "--data", str(tiny_train), "--out", str(run), *TINY]
    assert main(args[:1] + ["--steps", "2"] + args[1:]) == 0
    assert main(args[:1] + ["--steps", "3"] + args[1:]) == 0
    out, err = capsys.readouterr()
    assert "step 3" in out
    # The plan, before the first step: 16 photos, batch 4, demo base LR 16, 3 epochs.
    assert ("1 process(es) x batch 4 = global batch 4; lr 0.25 (16 x 4 / 256); 3 epochs x 4 steps = 12 "
            "(warmup 4), this run to step 3; resnet18, torch loader, cpu fp32") in err
    records = _metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3]  # 3 continues, nothing repeated
    _assert_same_run(_metrics(uninterrupted)[:3], records)


def test_knn_monitor_logs_at_epoch_ends_and_leaves_training_unchanged(uninterrupted: Path, tiny_train: Path,
                                                                       tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    val = tiny_train.parent / "val"
    pretrain(_cfg(tiny_train, run, f"schedule.steps={STEPS}", "monitor.knn_every_epochs=1",
                  f"monitor.knn_train={tiny_train}", f"monitor.knn_val={val}"))
    records = _metrics(run)
    knn = [r for r in records if "knn_top1" in r]
    assert [r["step"] for r in knn] == [4, STEPS]  # the end of epoch 1 (4 steps an epoch) and of the run
    assert all(0 <= r["knn_top1"] <= r["knn_top5"] <= 100 and set(r) == {"step", "epoch", "knn_top1", "knn_top5"}
               for r in knn)
    # Neither the monitor (eval mode, global RNG draws) nor its extra checkpoint changes training.
    _assert_same_run(_metrics(uninterrupted), [r for r in records if "loss" in r])
    assert (run / "checkpoints" / "step_00000004.pt").exists()  # saved before the monitor ran
    assert any(p.name == "knn.png" for p in render_report(run))
    err = capsys.readouterr().err  # one line per monitor; no progress bars under run.progress=false
    assert err.count("kNN top-1") == 2 and "features" not in err


def test_a_knn_monitor_skipped_by_a_preemption_runs_on_resume(tiny_train: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """SLURM's signal at the step that ends epoch 1, then at the run's last step: each saves that
    step and skips its monitor, which the next start runs first; a finished run scores no step twice."""
    run, val = tmp_path / "run", tiny_train.parent / "val"
    cfg = partial(_cfg, tiny_train, run, f"schedule.steps={STEPS}", "monitor.knn_every_epochs=1",
                  f"monitor.knn_train={tiny_train}", f"monitor.knn_val={val}")
    step = Trainer.step

    def signal_after(last: int) -> Callable[..., dict]:
        def stepped(self: Trainer, batch: object, at: int) -> dict:
            out = step(self, batch, at)
            if at + 1 == last:
                os.kill(os.getpid(), signal.SIGUSR2)  # handled at this step's boundary
            return out
        return stepped

    def knn_steps() -> list[int]:
        return [r["step"] for r in _metrics(run) if "knn_top1" in r]

    for last, expect in ((4, []), (STEPS, [4])):
        with monkeypatch.context() as m:
            m.setattr(Trainer, "step", signal_after(last))
            summary = pretrain(cfg())
        assert summary["preempted"] and summary["step"] == last and knn_steps() == expect
    for _ in range(2):
        assert not pretrain(cfg())["preempted"]
        assert knn_steps() == [4, STEPS]


def test_a_failing_knn_monitor_warns_and_training_goes_on(tiny_train: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    # A set that fails only once read (every file broken since the run began), hours in.
    broken = tmp_path / "broken"
    for d in tiny_train.iterdir():
        (broken / d.name).mkdir(parents=True)
        (broken / d.name / "x.jpg").write_bytes(b"not a jpeg")
    summary = pretrain(_cfg(tiny_train, tmp_path / "run", "schedule.steps=5", "monitor.knn_every_epochs=1",
                            f"monitor.knn_train={tiny_train}", f"monitor.knn_val={broken}"))
    assert summary["step"] == 5
    err = capsys.readouterr().err
    assert err.count("warning: kNN monitor at step") == 2 and "could be decoded" in err


def _during_the_monitor(tiny_train: Path, tmp_path: Path) -> tuple[subprocess.Popen, list[str], threading.Thread]:
    """A pretrain process whose first kNN monitor (at step 4, on 500-px photos) is running now."""
    bank = build_photo_folder(tmp_path / "bank", per_class_train=16, per_class_val=0, side=500) / "train"
    cmd = [sys.executable, "-m", "mveb", "pretrain", "--config", "demo", "--data", str(tiny_train),
           "--out", str(tmp_path / "run"), "--steps", str(STEPS), *TINY, "data.workers=1", "run.progress=true",
           "monitor.knn_every_epochs=1", f"monitor.knn_train={bank}", f"monitor.knn_val={bank}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while "features train" not in "".join(err):  # the monitor's progress bar: its loader is starting
        assert proc.poll() is None, "".join(err)[-3000:]
        assert time.monotonic() < deadline, "the monitor never started"
        time.sleep(0.02)
    time.sleep(0.5)  # its worker process is running
    return proc, err, reader


@pytest.mark.slow
def test_a_signal_during_the_knn_monitor_is_a_clean_preemption(tiny_train: Path, tmp_path: Path) -> None:
    """SLURM signals the whole process group: the monitor's loader worker must not die of it, and
    the trainer stops at the next step boundary as for any preemption."""
    proc, err, reader = _during_the_monitor(tiny_train, tmp_path)
    os.killpg(proc.pid, signal.SIGTERM)  # torch's workers die of SIGTERM (not of SIGUSR2, whose handler they inherit)
    out = proc.stdout.read()
    proc.wait(timeout=300)
    reader.join(timeout=10)
    assert proc.returncode == 0, "".join(err)[-3000:]
    assert "preempted" in out
    records = _metrics(tmp_path / "run")
    assert [r["step"] for r in records if "knn_top1" in r] == [4]  # it finished, then the run stopped
    assert load_checkpoint(latest_checkpoint(tmp_path / "run"))["step"] == 5


@pytest.mark.slow
def test_a_job_killed_during_the_knn_monitor_resumes_training_without_it(tiny_train: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A monitor that kills its job (SIGKILL: out of memory, or SLURM past its grace time) is not
    retried at the restart, where it could end every attempt at the same step."""
    proc, _, reader = _during_the_monitor(tiny_train, tmp_path)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    run = tmp_path / "run"
    summary = pretrain(_cfg(tiny_train, run, f"schedule.steps={STEPS}", "monitor.knn_every_epochs=1",
                            f"monitor.knn_train={tiny_train}", f"monitor.knn_val={tiny_train.parent / 'val'}"))
    assert summary["step"] == STEPS and summary["resumed_from"].endswith("step_00000004.pt")
    assert "the kNN monitor at step 4 began but never ended" in capsys.readouterr().err
    assert [r["step"] for r in _metrics(run) if "knn_top1" in r] == [STEPS]


def test_a_runs_config_json_repeats_the_run(uninterrupted: Path, tiny_train: Path, tmp_path: Path) -> None:
    run = tmp_path / "again"
    assert main(["pretrain", "--config", str(uninterrupted / "config.json"), "--data", str(tiny_train),
                 "--out", str(run), "--steps", "3"]) == 0
    _assert_same_run(_metrics(uninterrupted)[:3], _metrics(run))
    saved = json.loads((run / "config.json").read_text())
    assert saved["run"]["out"] == str(run) and saved["model"] == json.loads((uninterrupted / "config.json").read_text())["model"]


def test_batch_size_flag_replaces_a_runs_saved_global_batch(uninterrupted: Path, tiny_train: Path,
                                                             tmp_path: Path) -> None:
    saved = json.loads((uninterrupted / "config.json").read_text())
    saved["data"]["global_batch_size"] = 8
    (tmp_path / "config.json").write_text(json.dumps(saved))
    run = tmp_path / "smaller"
    assert main(["pretrain", "--config", str(tmp_path / "config.json"), "--data", str(tiny_train), "--out", str(run),
                 "--steps", "1", "--batch-size", "2"]) == 0
    data = json.loads((run / "config.json").read_text())["data"]
    assert (data["batch_size"], data["global_batch_size"]) == (2, None)


@pytest.mark.parametrize("argv,message", [
    (["optim.no_such_key=1"], "unknown config key 'optim.no_such_key'"),
    (["--data", "/no/such/folder"], "does not exist"),
    (["data.global_batch_size=16"], "not divisible by the world size 3"),
    (["--resume", "/no/such.pt"], "no such checkpoint"),
    (["loss.entropy_batch=world"], "use local (per GPU) or global (all GPUs)"),
    (["model.sync_bn_group=rack"], "use world (all GPUs) or node (one host's)"),
    (["loss.entropy_batch=global", "loss.impl=reference"], "needs loss.impl auto, torch or triton"),
    (["data.dali_tuning=prefetch=2"], "given for the torch loader; it applies to dali only"),
    (["data.loader=dali", "data.dali_tuning=prefetch=0"], "prefetch must be at least 1"),
    (["monitor.knn_every_epochs=5"], "monitor.knn_train='': the kNN monitor needs a labelled ImageFolder"),
    (["monitor.knn_every_epochs=-1"], "monitor.knn_every_epochs must be 0 (off) or more"),
    # Each once failed only inside the loop (a ZeroDivisionError at the first step, a
    # ValueError from the loss or DataLoader) or trained on nonsense (a NaN learning rate).
    (["run.checkpoint_every_steps=0"], "run.checkpoint_every_steps=0; it must be at least 1"),
    (["run.log_every_steps=0"], "run.log_every_steps=0; it must be at least 1"),
    (["loss.impl=bogus"], "loss.impl='bogus'; use one of auto, triton, torch, reference"),
    (["data.workers=-1"], "data.workers=-1; it must be 0"),
    (["optim.base_lr=nan"], "optim.base_lr=nan; it must be a positive number"),
    (["schedule.ema_momentum=2"], "schedule.ema_momentum=2.0; it must be in [0, 1]"),
    (["model.proj_dim=0"], "model.proj_dim=0; it must be at least 1"),
    (["dist.backend=mpi"], "dist.backend='mpi'; use one of auto, nccl, gloo"),
    (["--epochs", "1"], "schedule.warmup_epochs=2 with 1 epochs; it must be 0 to 1"),
    # An empty --out trained into the working directory; one inside the data became a class.
    (["--out", ""], "no run folder given; pass --out DIR"),
    (["--out", "TINY/runs/a"], "/runs/a is inside --data"),
    # The override once won silently.
    (["--loader", "torch", "data.loader=dali"], "--loader and data.loader=dali both set data.loader; give one"),
    (["--batch-size", "4", "data.global_batch_size=8"], "--batch-size and data.global_batch_size=8 both set"),
    # An override after a later flag was once an unrecognized argument, not the override it is.
    (["optim.base_lr=0.1", "--epochs", "3", "model.proj_dim=0"], "model.proj_dim=0; it must be at least 1"),
    (["monitor.knn_every_epochs=1", "monitor.knn_train=TINY", "monitor.knn_val=PHOTOS"],
     "monitor.knn_train and monitor.knn_val have different class folders (4 and 12)"),
])
def test_bad_config_is_one_line(argv: list[str], message: str, tiny_train: Path, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # A 3-process job as torchrun describes it; the check runs before any rendezvous.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    base = ["pretrain", "--config", "demo", "--data", str(tiny_train), "--out", str(tmp_path / "run")]
    if any("PHOTOS" in a for a in argv):  # 12 class folders against tiny_train's 4
        photos = build_photo_folder(tmp_path / "photos", per_class_train=1, per_class_val=0, side=48) / "train"
        argv = [a.replace("PHOTOS", str(photos)) for a in argv]
    argv = [a.replace("TINY", str(tiny_train)) for a in argv]
    assert main(base + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists() and not (tiny_train / "runs").exists()


def test_a_read_only_run_folder_is_one_line_before_the_loader(tiny_train: Path, tmp_path: Path,
                                                              unprivileged: list[str]) -> None:
    """It once passed the config check and ended in a PermissionError traceback on the lock file."""
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    r = subprocess.run([*unprivileged, sys.executable, "-m", "mveb", "pretrain", "--config", "demo", "--data",
                        str(tiny_train), "--out", str(ro)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"mveb pretrain: error: --out {ro}: cannot write in {ro} (Permission denied)"
    assert not list(ro.iterdir())


def _one_step(loader_name: str, impl: str, data: Path) -> dict:
    from pipeline.loaders import build_loader

    cfg = get_config("demo", TINY + [f"loss.impl={impl}", f"data.loader={loader_name}"])
    dist = DistInfo(0, 1, 0, torch.device("cpu"), False)
    loader = build_loader(loader_name, data, cfg.data.recipe(), cfg.data.batch_size, seed=0, workers=1)
    trainer = Trainer(cfg, dist, len(loader))
    return trainer.step(next(iter(loader)), 0)


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_one_step_torch_loader_each_loss_impl(impl: str, tiny_train: Path) -> None:
    out = _one_step("torch", impl, tiny_train)
    assert math.isfinite(float(out["loss"])) and not out["skipped"]
    assert out["lr"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_one_step_other_loaders(backend: str, tiny_train: Path) -> None:
    try:
        out = _one_step(backend, "torch", tiny_train)
    except UsageError as e:
        pytest.skip(f"{backend} loader unavailable here: {e}")
    assert math.isfinite(float(out["loss"])) and not out["skipped"]


def _two_ranks(data: Path, run: Path, *extra: str) -> list[tuple[str, str]]:
    """A 2-step run of two ranks as torchrun would start them; their (stdout, stderr)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mveb", "pretrain", "--config", "demo", "--data", str(data), "--out", str(run),
           "--steps", "2", *TINY, "data.global_batch_size=8", *extra]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    return outs


@pytest.fixture(scope="module")
def two_rank_run(tiny_train: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, str]]]:
    run = tmp_path_factory.mktemp("ddp") / "run"
    return run, _two_ranks(tiny_train, run)


@pytest.mark.slow
def test_two_process_gloo_run(two_rank_run: tuple[Path, list[tuple[str, str]]]) -> None:
    """DDP, agreed checkpoints, one loader state per rank."""
    run, outs = two_rank_run
    assert "step 2" in outs[0][0] and outs[1][0] == ""  # only rank 0 reports
    assert [r["step"] for r in _metrics(run)] == [1, 2]
    state = load_checkpoint(latest_checkpoint(run))
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert [s["loader"]["batches_done"] for s in state["ranks"]] == [2, 2]
    assert state["config"]["data"]["batch_size"] == 4


@pytest.mark.slow
def test_two_process_global_entropy(two_rank_run: tuple[Path, list[tuple[str, str]]], tiny_train: Path,
                                    tmp_path: Path) -> None:
    """Same seeds and data, entropy over the 8 gathered rows instead of each rank's 4: same
    align at step 1 (same weights and views), another entropy."""
    local = _metrics(two_rank_run[0])[0]
    _two_ranks(tiny_train, tmp_path / "run", "loss.entropy_batch=global")
    gathered = _metrics(tmp_path / "run")[0]
    assert gathered["align"] == pytest.approx(local["align"], rel=1e-5)
    assert abs(gathered["entropy"] - local["entropy"]) > 1e-4 * abs(local["entropy"])


def test_full_disk_keeps_training_and_names_the_checkpoint_to_resume_from(
        tiny_train: Path, small_disk: Callable[[str], Path], capfd: pytest.CaptureFixture[str]) -> None:
    run = small_disk("200m") / "run"  # room for one tiny-preset checkpoint (135 MB), not two
    cfg = _cfg(tiny_train, run, "schedule.steps=4", "run.checkpoint_every_steps=2")
    with pytest.raises(UsageError, match=r"step 4 could not be written .* newest on disk is step_00000002\.pt"):
        pretrain(cfg)
    assert "warning: checkpoint at step 4 not written (No space left on device)" in capfd.readouterr().err
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4]  # trained on past the failed write
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002.pt"]  # no partial file left

    small_disk("400m")  # the user frees space
    summary = pretrain(cfg)
    assert summary["resumed_from"].endswith("step_00000002.pt") and summary["step"] == 4
    assert int(load_checkpoint(latest_checkpoint(run))["step"]) == 4


def test_a_second_job_on_the_same_run_folder_is_refused_until_the_first_ends(tiny_train: Path,
                                                                              tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mveb", "pretrain", "--config", "demo", "--data", str(tiny_train), "--out", str(run),
           "--steps", "1000", *TINY]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never reached step 1"
            time.sleep(0.05)
        with pytest.raises(UsageError, match=rf"{run} is in use by pid {first.pid} on "):
            pretrain(_cfg(tiny_train, run, "schedule.steps=2"))
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # no chance to unlock: the kernel releases the flock
        first.communicate(timeout=60)
    assert pretrain(_cfg(tiny_train, run, "schedule.steps=2"))["step"] >= 2  # the lock died with its holder


def test_monitor_sets_compare_the_classes_the_loaders_read(tiny_train: Path, tmp_path: Path) -> None:
    """A hidden folder (.ipynb_checkpoints) in one set is no class: no false mismatch."""
    val = tmp_path / "val"
    shutil.copytree(tiny_train, val)
    (val / ".ipynb_checkpoints").mkdir()
    cfg = get_config("demo", [f"data.path={tiny_train}", "monitor.knn_every_epochs=1",
                              f"monitor.knn_train={tiny_train}", f"monitor.knn_val={val}"])
    check_config(cfg, 1)


def test_an_error_mid_epoch_ends_the_process_despite_its_loader_workers(tiny_train: Path, tmp_path: Path) -> None:
    # The workers block SIGTERM (so that SLURM's signal reaches only the trainer), and the
    # error's traceback keeps them alive: the interpreter's exit then waited on them forever.
    script = ("import sys, train.step\n"
              "def fail(self, batch, step): raise RuntimeError('injected step failure')\n"
              "train.step.Trainer.step = fail\n"
              "from mveb.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    argv = ["pretrain", "--config", "demo", "--data", str(tiny_train), "--out", str(tmp_path / "run"),
            *[a for a in TINY if not a.startswith("data.workers")], "data.workers=1"]
    r = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "RuntimeError: injected step failure" in r.stderr, r.stderr[-2000:]
    assert "DataLoader worker" not in r.stderr  # the workers' ends are not reported as failures


def test_a_set_no_file_of_which_decodes_is_one_line_with_loader_workers(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken"
    for c in ("a", "b"):
        (broken / c).mkdir(parents=True)
        for i in range(4):
            (broken / c / f"{i}.jpg").write_bytes(b"not a jpeg")
    argv = ["pretrain", "--config", "demo", "--data", str(broken), "--out", str(tmp_path / "run"),
            *[a for a in TINY if not a.startswith("data.workers")], "data.workers=1"]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert err == [f"mveb pretrain: error: none of the 8 images can be decoded (the first is {broken}/a/0.jpg); "
                   "run `mveb validate` on the set"], err
