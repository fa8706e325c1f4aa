"""`mveb lineval --out`: a run stopped by a real SIGTERM resumes where it stopped, a changed setting is refused,
a completed run is not trained again."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

import train.features
import train.lineval
from mveb.cli import main
from train.checkpoint import checkpoints, load_checkpoint, load_latest
from train.features import load_backbone
from train.lineval import linear_eval
from train.lineval_state import Preempted

SIGTERM_EXIT = 128 + signal.SIGTERM
CROSS_ENTROPY = torch.nn.functional.cross_entropy


def _losses(monkeypatch: pytest.MonkeyPatch, sigterm_at: int | None = None) -> list[list[int]]:
    """Each training batch's labels, as the head's loss sees them; with `sigterm_at`, a real SIGTERM is
    delivered to this process inside that batch (1-based, counted over every run in the test)."""
    seen: list[list[int]] = []

    def loss(logits: torch.Tensor, labels: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(labels.tolist())
        if len(seen) == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return CROSS_ENTROPY(logits, labels, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", loss)
    return seen


def _argv(photo_root: Path, out: Path, *extra: str) -> list[str]:
    return ["lineval", "--train", str(photo_root / "train"), "--val", str(photo_root / "val"), "--arch", "resnet18",
            "--image-size", "32", "--batch-size", "96", "--lr", "0.5", "--workers", "0", "--device", "cpu",
            "--out", str(out), *extra]


def _head(out: Path) -> dict[str, torch.Tensor]:
    found = load_latest(out)
    assert found is not None
    return found[1]["head"]


PRECOMPUTE = dict(image_size=32, batch_size=96, epochs=3, lr=0.5, precompute=True, workers=0)  # 3 batches an epoch


def test_precompute_run_stopped_by_sigterm_resumes_to_the_same_head(photo_root: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    backbone = load_backbone(None, "resnet18")
    data = (str(photo_root / "train"), str(photo_root / "val"))
    handler = signal.getsignal(signal.SIGTERM)
    plain = linear_eval(backbone, *data, **PRECOMPUTE)
    whole_batches = _losses(monkeypatch)
    whole = linear_eval(backbone, *data, out=tmp_path / "whole", **PRECOMPUTE)
    assert whole == plain  # --out changes nothing about the numbers

    cut = tmp_path / "cut"
    cut_batches = _losses(monkeypatch, sigterm_at=5)
    with pytest.raises(Preempted, match=r"^stopped on SIGTERM after batch 2/3 of epoch 2/3; saved "
                                        r".*step_00000005\.pt; rerun the same command to resume$"):
        linear_eval(backbone, *data, out=cut, **PRECOMPUTE)
    assert len(cut_batches) == 5  # the batch in flight was finished, no other begun
    assert signal.getsignal(signal.SIGTERM) is handler
    assert (cut / "features_train.pt").exists() and (cut / "features_val.pt").exists()

    def no_extraction(*args: object, **kwargs: object) -> None:
        raise AssertionError("a resumed precompute run extracted features again")

    monkeypatch.setattr(train.lineval, "extract_features", no_extraction)
    resumed = linear_eval(backbone, *data, out=cut, **PRECOMPUTE)
    assert cut_batches == whole_batches  # same batches in the same order, none trained twice
    assert resumed == pytest.approx(whole)
    for name, weights in _head(tmp_path / "whole").items():
        torch.testing.assert_close(_head(cut)[name], weights)
    assert not list(cut.glob("features_*"))  # the cache goes once the run has its result


def test_checkpoint_minutes_saves_mid_epoch(photo_root: Path, tmp_path: Path) -> None:
    linear_eval(load_backbone(None, "resnet18"), str(photo_root / "train"), str(photo_root / "val"),
                out=tmp_path, checkpoint_minutes=1e-9, **PRECOMPUTE)
    kept = checkpoints(tmp_path)
    assert [p.name for p in kept] == ["step_00000008.pt", "step_00000009.pt"]  # after every batch, newest two kept
    mid = load_checkpoint(kept[0])
    assert (mid["epoch"], mid["batch"], mid["seen"]) == (2, 2, 192)


def test_augmented_run_stopped_by_sigterm_continues_the_epoch_order(photo_root: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    decoded: list[str] = []
    getitem = train.features._Folder.__getitem__

    def recording(self: train.features._Folder, i: int) -> tuple:
        if Path(self.samples[i][0]).parts[-3] == "train":
            decoded.append(self.samples[i][0])
        return getitem(self, i)

    monkeypatch.setattr(train.features._Folder, "__getitem__", recording)
    _losses(monkeypatch)
    assert main(_argv(photo_root, tmp_path / "whole", "--epochs", "2")) == 0
    whole, decoded[:] = list(decoded), []

    cut = tmp_path / "cut"
    _losses(monkeypatch, sigterm_at=4)
    capsys.readouterr()
    assert main(_argv(photo_root, cut, "--epochs", "2")) == SIGTERM_EXIT
    err = capsys.readouterr().err.splitlines()
    assert f"stopped on SIGTERM after batch 1/3 of epoch 2/2; saved {cut / 'checkpoints' / 'step_00000004.pt'}; " \
           "rerun the same command to resume" in err
    assert not (cut / "lineval.json").exists()
    first, decoded[:] = list(decoded), []
    assert len(first) == 4 * 96

    assert main(_argv(photo_root, cut, "--epochs", "2")) == 0
    assert f"resuming from {cut / 'checkpoints' / 'step_00000004.pt'} (epoch 2/2, 1 batches done)" in \
        capsys.readouterr().err
    assert first + decoded == whole  # the same order on, and the batch done before the stop not decoded again
    assert json.loads((cut / "lineval.json").read_text())["epochs"] == 2


@pytest.fixture(scope="module")
def completed(photo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A completed one-epoch precompute run on an exported backbone: (its --out, the backbone file)."""
    root = tmp_path_factory.mktemp("completed")
    backbone = root / "backbone.pth"
    torch.save(load_backbone(None, "resnet18").state_dict(), backbone)
    assert main(_argv(photo_root, root / "run", "--epochs", "1", "--precompute", "--checkpoint", str(backbone))) == 0
    return root / "run", backbone


def test_a_completed_run_prints_its_stored_result_without_training(
        completed: tuple[Path, Path], photo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    out, backbone = completed
    for name in ("train_head", "extract_features", "open_images"):
        monkeypatch.setattr(train.lineval, name, lambda *a, **k: pytest.fail("a completed run ran again"))
    again = tmp_path / "again.json"
    assert main(_argv(photo_root, out, "--epochs", "1", "--precompute", "--checkpoint", str(backbone),
                      "--json", str(again))) == 0
    stored = json.loads((out / "lineval.json").read_text())
    printed = json.loads(again.read_text())
    assert {k: v for k, v in printed.items() if k != "seconds"} == {k: v for k, v in stored.items() if k != "seconds"}
    assert f"top-1 {stored['top1']:6.2f}" in capsys.readouterr().out
    assert not list(out.glob("features_*"))


@pytest.mark.parametrize("change, says", [
    (["--lr", "0.2"], "with --lr 0.5, not 0.2"),
    (["--epochs", "2"], "with --epochs 1, not 2"),
    (["--batch-size", "64"], "with --batch-size 96, not 64"),
    (["--image-size", "48"], "with --image-size 32, not 48"),
    (["--no-precompute"], "with --precompute"),
    (["--copy-checkpoint"], "with --checkpoint "),
    (["--val", "TRAIN"], "with --val "),
])
def test_a_changed_setting_is_a_one_line_error(completed: tuple[Path, Path], photo_root: Path, tmp_path: Path,
                                               change: list[str], says: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out, backbone = completed
    options = {"--epochs": "1", "--checkpoint": str(backbone)}
    precompute = ["--precompute"]
    if change == ["--no-precompute"]:
        precompute = []
    elif change == ["--copy-checkpoint"]:  # the same weights under another name are another setting
        copy = tmp_path / "copy.pth"
        copy.write_bytes(backbone.read_bytes())
        options["--checkpoint"] = str(copy)
    else:
        options[change[0]] = str(photo_root / "train") if change[1] == "TRAIN" else change[1]
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*"))
    argv = _argv(photo_root, out, *precompute)
    for flag, value in options.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert says in err and "pass a new --out" in err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*")) == before  # nothing touched


def test_changed_weights_in_the_same_file_are_refused(photo_root: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    backbone = tmp_path / "backbone.pth"
    torch.save(load_backbone(None, "resnet18", seed=0).state_dict(), backbone)
    argv = _argv(photo_root, tmp_path / "run", "--epochs", "1", "--precompute", "--checkpoint", str(backbone))
    with pytest.MonkeyPatch.context() as m:
        _losses(m, sigterm_at=1)
        assert main(argv) == SIGTERM_EXIT
    torch.save(load_backbone(None, "resnet18", seed=1).state_dict(), backbone)  # the pretraining run moved on
    capsys.readouterr()
    assert main(argv) == 2
    assert "other backbone weights" in capsys.readouterr().err


def test_a_pretraining_run_folder_is_not_taken_over(photo_root: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "checkpoints" / "step_00000001.pt"
    ckpt.parent.mkdir()
    torch.save({"step": 1}, ckpt)
    assert main(_argv(photo_root, tmp_path, "--epochs", "1", "--precompute")) == 2
    assert "not a lineval --out folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.rglob("*")] == ["checkpoints", "step_00000001.pt"]


def test_an_out_that_is_a_file_is_named_so(photo_root: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "notes.txt"
    out.write_text("kept\n")
    assert main(_argv(photo_root, out, "--epochs", "1", "--precompute")) == 2
    assert f"--out {out} is a file" in capsys.readouterr().err  # once "cannot write .../settings.json: File exists"
    assert out.read_text() == "kept\n"


@pytest.mark.slow
def test_beton_run_stopped_by_sigterm_continues_the_epoch_order(photo_root: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ffcv")
    from pipeline.shards import build_shard

    beton = tmp_path / "train.beton"
    build_shard(photo_root / "train", beton, max_res=64, workers=1, progress=False)
    argv = ["lineval", "--train", str(beton), "--val", str(photo_root / "val"), "--arch", "resnet18", "--image-size",
            "32", "--batch-size", "96", "--epochs", "2", "--workers", "1", "--device", "cpu"]
    whole = _losses(monkeypatch)
    assert main(argv + ["--out", str(tmp_path / "whole")]) == 0
    cut = _losses(monkeypatch, sigterm_at=5)
    assert main(argv + ["--out", str(tmp_path / "cut")]) == SIGTERM_EXIT
    assert main(argv + ["--out", str(tmp_path / "cut")]) == 0
    assert len(whole) == 6 and cut == whole  # epoch 2 continues at its third batch, in the same order
