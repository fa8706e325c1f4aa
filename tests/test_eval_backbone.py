"""Backbones for evaluation from a real run (a checkpoint, an export); `mveb export`, `mveb report`; bad inputs."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision

from mveb.cli import main
from mveb.errors import UsageError
from train.checkpoint import latest_checkpoint
from train.config import get_config
from train.export import export_backbone
from train.features import load_backbone
from train.pretrain import pretrain
from train.report import render_report


@pytest.fixture(scope="module")
def run_dir(photo_train: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run folder: 2 steps of the demo preset, shrunk (4 images of 32 px, 64-d projector)."""
    run = tmp_path_factory.mktemp("run")
    overrides = [f"data.path={photo_train}", f"run.out={run}", "schedule.steps=2", "data.batch_size=4",
                 "data.global_size=32", "data.local_size=16", "data.workers=0", "model.proj_hidden=64",
                 "model.proj_dim=64", "run.progress=false", "run.tensorboard=false"]
    pretrain(get_config("demo", overrides))
    return run


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_run_folder_gives_the_checkpoints_backbone_and_arch(run_dir: Path) -> None:
    model = load_backbone(run_dir)
    assert model.arch_name == "resnet18" and not model.training
    saved = torch.load(latest_checkpoint(run_dir), weights_only=True)["model"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[f"backbone.{name}"], rtol=0, atol=0)


def test_report_plots_a_real_runs_metrics(run_dir: Path) -> None:
    assert [p.name for p in render_report(run_dir)] == ["loss.png", "schedule.png", "throughput.png",
                                                        "data_wait.png"]


def test_random_init_is_seeded() -> None:
    a, b = load_backbone(None, "resnet18"), load_backbone(None, "resnet18")
    torch.testing.assert_close(a.conv1.weight, b.conv1.weight, rtol=0, atol=0)
    assert not torch.equal(a.conv1.weight, load_backbone(None, "resnet18", seed=1).conv1.weight)


def test_export_loads_into_torchvision_missing_only_fc(run_dir: Path, tmp_path: Path) -> None:
    out = export_backbone(run_dir, tmp_path / "sub" / "backbone.pth")
    assert [p.name for p in out.parent.iterdir()] == ["backbone.pth"]  # no temporary left behind
    net = torchvision.models.resnet18()
    result = net.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    # The exported file is itself a valid --checkpoint, and gives the same features.
    net.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), load_backbone(out, "resnet18")(x))
        torch.testing.assert_close(net(x), load_backbone(run_dir)(x))


def test_mveb_export_cli(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(run_dir), "--out", str(tmp_path / "b.pth")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "b.pth")
    # An export does not name its arch: re-exporting it takes the --arch its error asks for.
    assert "pass the --arch it was trained with" in _one_line_error(
        ["export", str(tmp_path / "b.pth"), "--out", str(tmp_path / "c.pth")], capsys)
    assert main(["export", str(tmp_path / "b.pth"), "--out", str(tmp_path / "c.pth"), "--arch", "resnet18"]) == 0


def test_arch_mismatch_is_a_one_line_error(run_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_line_error(["knn", "--checkpoint", str(run_dir), "--arch", "resnet50", "--train", str(tmp_path),
                           "--val", str(tmp_path)], capsys)
    assert "resnet50" in err and "resnet18" in err
    exported = export_backbone(run_dir, tmp_path / "b.pth")
    with pytest.raises(UsageError, match="does not hold resnet34 weights"):
        load_backbone(exported, "resnet34")  # an export has no config: the weights must fit
    with pytest.raises(UsageError, match="does not hold resnet50 weights"):
        load_backbone(exported)  # default arch resnet50: shapes differ


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_a_file_that_is_not_a_checkpoint_is_a_one_line_error(content: bytes | None, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.pt"
    if content is None:
        torch.save({"weights": [1, 2, 3]}, path)  # readable, but neither format
    else:
        path.write_bytes(content)
    _one_line_error(["export", str(path), "--out", str(tmp_path / "o.pth")], capsys)
    assert not (tmp_path / "o.pth").exists()


def test_missing_paths_are_one_line_errors(photo_root: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert "does not exist" in _one_line_error(["export", str(tmp_path / "nope"), "--out", "x.pth"], capsys)
    assert "no readable checkpoint" in _one_line_error(["export", str(tmp_path), "--out", "x.pth"], capsys)
    err = _one_line_error(["knn", "--arch", "resnet18", "--train", str(tmp_path / "missing"), "--val",
                           str(photo_root / "val")], capsys)
    assert "missing" in err
    err = _one_line_error(["lineval", "--arch", "resnet18", "--train", str(photo_root / "train"), "--val",
                           str(tmp_path)], capsys)
    assert str(tmp_path) in err
    assert "unknown backbone" in _one_line_error(["knn", "--arch", "vgg16", "--train", str(tmp_path), "--val",
                                                 str(tmp_path)], capsys)


@pytest.mark.parametrize("argv, says", [
    (["knn", "--image-size", "8"], "--image-size"),
    (["knn", "--k", "0"], "--k"),
    (["knn", "--temperature", "0"], "--temperature"),
    (["lineval", "--epochs", "0"], "--epochs"),
    (["lineval", "--batch-size", "0"], "--batch-size"),
    (["knn", "--device", "tpu"], "device"),
    (["knn", "--device", "mps"], "device 'mps' is not supported"),  # names torch knows: once a traceback
    (["lineval", "--device", "xla"], "device 'xla' is not supported"),
])
def test_bad_options_are_one_line_errors(argv: list[str], says: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert says in _one_line_error(argv + ["--train", str(tmp_path), "--val", str(tmp_path)], capsys)


@pytest.mark.parametrize("command", ["export", "report", "knn"])
def test_a_full_disk_is_a_one_line_error_leaving_no_file(command: str, run_dir: Path, photo_root: Path,
                                                        small_disk: Callable[[str], Path],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    disk = small_disk("64k")
    with pytest.raises(OSError), open(disk / "fill", "wb", buffering=0) as fill:
        while True:  # until the filesystem is full
            fill.write(b"\0" * 4096)
    argv = {"export": ["export", str(run_dir), "--out", str(disk / "b.pth")],
            "report": ["report", str(run_dir), "--out", str(disk / "plots")],
            "knn": ["knn", "--checkpoint", str(run_dir), "--train", str(photo_root / "train"),
                    "--val", str(photo_root / "val"), "--image-size", "32", "--json", str(disk / "knn.json")]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err  # knn's progress bars come first
    assert "Traceback" not in err and err.strip().splitlines()[-1].endswith("No space left on device")
    assert sorted(p.name for p in disk.rglob("*")) == ["fill"] + (["plots"] if command == "report" else [])


def test_export_refuses_to_replace_a_training_checkpoint(run_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    # Once written silently: the run's next resume then failed on KeyError 'model'.
    run = shutil.copytree(run_dir, tmp_path / "run")
    newest = latest_checkpoint(run)
    before = newest.read_bytes()
    for out in (newest, newest.with_name("step_99999999.pt")):
        assert "checkpoint folder" in _one_line_error(["export", str(run), "--out", str(out)], capsys)
    kept = shutil.copy(newest, tmp_path / "kept.pt")
    assert "the checkpoint being read" in _one_line_error(["export", str(kept), "--out", str(kept)], capsys)
    assert torch.load(kept, weights_only=True).keys() == torch.load(newest, weights_only=True).keys()
    assert "is a folder" in _one_line_error(["export", str(run), "--out", f"{tmp_path}/new/"], capsys)
    assert latest_checkpoint(run) == newest and newest.read_bytes() == before
    assert not (tmp_path / "new").exists()


def test_resuming_from_an_exported_backbone_is_a_one_line_error(run_dir: Path, photo_train: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    run = shutil.copytree(run_dir, tmp_path / "run")
    exported = export_backbone(run, tmp_path / "b.pth")
    argv = ["pretrain", "--config", str(run / "config.json"), "--data", str(photo_train), "--out", str(run),
            "--steps", "3"]
    err = _one_line_error(argv + ["--resume", str(exported)], capsys)
    assert f"{exported} is not a pretraining checkpoint (it has no model, momentum, optimizer" in err
    # Put where the run keeps its checkpoints (by hand: export refuses), it is the newest one.
    shutil.copy(exported, latest_checkpoint(run).with_name("step_99999999.pt"))
    assert "step_99999999.pt is not a pretraining checkpoint" in _one_line_error(argv, capsys)


def test_different_class_folders_are_found_before_any_feature(photo_root: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    few = tmp_path / "few"
    for c in sorted(p.name for p in (photo_root / "val").iterdir())[:3]:
        shutil.copytree(photo_root / "val" / c, few / c)
    for command in ("knn", "lineval"):  # once found only after extracting both sets' features
        err = _one_line_error([command, "--arch", "resnet18", "--image-size", "32", "--workers", "0",
                               "--train", str(photo_root / "train"), "--val", str(few)], capsys)
        assert "--train and --val have different class folders (12 and 3)" in err


def test_lineval_on_a_train_set_no_image_of_which_decodes_is_an_error(photo_root: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken"
    for c in (photo_root / "val").iterdir():
        (broken / c.name).mkdir(parents=True)
        (broken / c.name / "x.jpg").write_bytes(b"not a jpeg")
    # Augmented: once a head that never trained, scored at chance, and exit 0.
    assert main(["lineval", "--arch", "resnet18", "--image-size", "32", "--epochs", "2", "--workers", "0",
                 "--train", str(broken), "--val", str(photo_root / "val")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("error: no --train image could be decoded (12 unreadable); run mveb validate on it"), err
