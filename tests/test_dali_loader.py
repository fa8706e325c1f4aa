"""DALI multi-crop loader on real JPEGs: the batch contract, seeds, ranks, resume, bad files.

Runs DALI's CPU backend here; the `gpu` tests run the nvJPEG (`mixed`) path on a GPU host.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mveb.errors import UsageError
from pipeline.batch import MultiCropBatch
from pipeline.dali_graph import DALITuning
from pipeline.dali_loader import DALIMultiCropLoader
from pipeline.demo_photos import build_photo_folder
from pipeline.images import list_image_folder, open_rgb
from pipeline.recipe import MultiCropRecipe
from pipeline.validate import kept_report, validate

RECIPE = MultiCropRecipe().with_views(2, 64, 2, 32)
TINY = MultiCropRecipe().with_views(1, 24, 1, 16)
# Whole-image crops, every random op off, raw 0..255 pixels out: the decoded image itself.
IDENTITY = replace(RECIPE.with_views(2, 32, 0, 16), global_scale=(1.0, 1.0), ratio=(0.01, 100.0), flip_p=0.0,
                   jitter_p=0.0, grayscale_p=0.0, global_blur_p=(0.0, 0.0), global_solarize_p=(0.0, 0.0),
                   mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)


@pytest.fixture(scope="module")
def indexed(photo_train: Path) -> list[tuple[str, int]]:
    """37 real JPEGs labelled by their index, so labels name files (37: shards of 18 and 19)."""
    _, samples = list_image_folder(photo_train)
    return [(path, i) for i, (path, _) in enumerate(samples[::7][:37])]


def _epoch(loader: DALIMultiCropLoader) -> list[MultiCropBatch]:
    return list(loader)


def _same(a: MultiCropBatch, b: MultiCropBatch) -> bool:
    return (torch.equal(a.global_views, b.global_views) and torch.equal(a.local_views, b.local_views)
            and torch.equal(a.labels, b.labels))


def test_batches_follow_the_contract(photo_train: Path) -> None:
    loader = DALIMultiCropLoader(photo_train, RECIPE, 16)
    classes, samples = list_image_folder(photo_train)
    assert len(loader) == len(samples) // 16
    batch = next(iter(loader))
    batch.check(RECIPE, 16)
    assert batch.global_views.dtype == torch.float32 and batch.global_views.device.type == "cpu"
    assert batch.labels.dtype == torch.int64 and 0 <= batch.labels.min() and batch.labels.max() < len(classes)
    # Normalized pixels: each channel stays within what (0..255 - 255 mean) / (255 std) allows.
    for c in range(3):
        lo, hi = -RECIPE.mean[c] / RECIPE.std[c], (1 - RECIPE.mean[c]) / RECIPE.std[c]
        for views in (batch.global_views, batch.local_views):
            ch = views[:, c]
            assert lo - 1e-3 <= ch.min() and ch.max() <= hi + 1e-3
    assert -1.5 < batch.global_views.mean() < 1.5 and 0.3 < batch.global_views.std() < 2.0


def test_views_are_grouped_by_view_then_sample(indexed: list[tuple[str, int]]) -> None:
    # View 1 and view 2 of a sample are the same pixels here, so equal halves prove the
    # [view 1 of all samples, view 2 of all samples] order.
    batch = next(iter(DALIMultiCropLoader(indexed, IDENTITY, 4)))
    first, second = batch.global_views.chunk(2)
    assert torch.equal(first, second)
    assert not torch.equal(first[0], first[1])
    assert batch.local_views.shape == (0, 3, 16, 16)


def test_decodes_awkward_files_like_pil(photo_train: Path, tmp_path: Path) -> None:
    # What `mveb validate` accepts, DALI must decode to the same upright 8-bit RGB as PIL.
    rgb = open_rgb(next(photo_train.rglob("*.jpg"))).resize((48, 36))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, "rotate 90 degrees clockwise to view"
    files = {"cmyk.jpg": (rgb.convert("CMYK"), {}), "gray.jpg": (rgb.convert("L"), {}),
             "png_named.jpg": (rgb, {"format": "PNG"}), "rotated.jpg": (rgb, {"exif": exif}),
             "deep.png": (Image.fromarray((np.asarray(rgb.convert("L")).astype(np.uint16) * 257)), {}),
             # Other formats DALI reads, under a .jpg name as scraped data has them
             **{f"{fmt}.jpg": (rgb, {"format": fmt}) for fmt in ("BMP", "TIFF", "PPM", "WEBP", "JPEG2000")}}
    for name, (img, kwargs) in files.items():
        img.save(tmp_path / name, quality=95, **kwargs)
    samples = [(str(tmp_path / name), i) for i, name in enumerate(files)]
    batch = next(iter(DALIMultiCropLoader(samples, IDENTITY, len(samples))))
    for view, label in zip(batch.global_views[:len(samples)], batch.labels.tolist()):
        ref = np.asarray(open_rgb(samples[label][0]).resize((32, 32), Image.BICUBIC), dtype=np.float32)
        assert np.abs(view.permute(1, 2, 0).numpy() - ref).mean() < 2.0, samples[label][0]


def test_each_op_fires_at_its_views_rate(photo_train: Path) -> None:
    recipe = replace(IDENTITY, global_solarize_p=(0.0, 0.5))
    first, second = next(iter(DALIMultiCropLoader(photo_train, recipe, 64))).global_views.chunk(2)
    solarized = torch.where(first >= recipe.solarize_threshold, 255 - first, first)
    hits = [torch.equal(b, s) for b, s in zip(second, solarized)]
    misses = [torch.equal(b, a) for b, a in zip(second, first)]
    assert all(h != m for h, m in zip(hits, misses))  # each sample: exactly solarized, or untouched
    assert 0.3 < sum(hits) / len(hits) < 0.7


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("blur", ["always", "conditional"])
def test_blur_leaves_undrawn_samples_untouched(photo_train: Path, blur: str, device: str) -> None:
    # "always" blurs every sample, the undrawn ones with an identity window: they must
    # come out bit-identical, as the conditional graph leaves them.
    recipe = replace(IDENTITY, global_blur_p=(0.0, 0.5))
    loader = DALIMultiCropLoader(photo_train, recipe, 64, device=device, tuning=DALITuning(blur=blur))
    first, second = next(iter(loader)).global_views.cpu().chunk(2)
    untouched = [torch.equal(a, b) for a, b in zip(first, second)]
    assert 0.3 < sum(untouched) / len(untouched) < 0.7
    blurred = [(a - b).abs().mean() for a, b, same in zip(first, second, untouched) if not same]
    assert min(blurred) > 0.05  # a real blur, not rounding noise


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_stacked_locals_flip_each_view_on_its_own(indexed: list[tuple[str, int]], device: str) -> None:
    # Whole-image locals with only the flip on: each is the image or its mirror, and the
    # views of one sample flip independently (all four alike: 1 in 8 samples).
    recipe = replace(IDENTITY.with_views(1, 32, 4, 16), local_scale=(1.0, 1.0), flip_p=0.5, local_blur_p=0.0)
    loader = DALIMultiCropLoader(indexed, recipe, 32, device=device, tuning=DALITuning(stack_locals=True))
    views = next(iter(loader)).local_views.cpu().view(4, 32, 3, 16, 16)
    first = views[0]
    same = torch.stack([(v == first).flatten(1).all(1) for v in views[1:]])
    mirrored = torch.stack([(v == first.flip(-1)).flatten(1).all(1) for v in views[1:]])
    assert (same | mirrored).all()
    assert 0.25 < mirrored.float().mean() < 0.75
    assert same.all(0).float().mean() < 0.4


def _group_stats(batches: list[MultiCropBatch], name: str) -> torch.Tensor:
    x = torch.cat([getattr(b, name) for b in batches]).float()
    return torch.cat([x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)), (x[..., 1:] - x[..., :-1]).abs().mean().view(1)])


def test_stacked_locals_match_per_view_statistics(photo_train: Path) -> None:
    # Same recipe, other draws: per-channel means and stds and the gradient (blur, crop
    # scale) of the locals agree within the backends-agree bounds.
    stats = []
    for stack in (False, True):
        loader = DALIMultiCropLoader(photo_train, RECIPE, 32, tuning=DALITuning(stack_locals=stack))
        stats.append(_group_stats(_epoch(loader) + _epoch(loader), "local_views"))
    plain, stacked = stats
    assert (plain[:3] - stacked[:3]).abs().max() < 0.2 and (plain[3:6] - stacked[3:6]).abs().max() < 0.15
    assert abs(plain[6] / stacked[6] - 1) < 0.2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_tuning_changes_speed_not_outputs(indexed: list[tuple[str, int]], device: str) -> None:
    ref = _epoch(DALIMultiCropLoader(indexed, RECIPE, 8, seed=3, device=device))[:2]
    other = DALITuning(hw_decoder_load=0.3, prefetch=1, concurrency="full", resize_minibatch=3)
    got = _epoch(DALIMultiCropLoader(indexed, RECIPE, 8, seed=3, device=device, tuning=other))[:2]
    for x, y in zip(got, ref):
        if device == "cpu":
            assert _same(x, y)
            continue
        # Another hardware-decoder share: the hardware and the CUDA JPEG decoders may round
        # a few pixels differently (a different crop or draw would differ by far more).
        assert torch.equal(x.labels, y.labels) and (x.global_views - y.global_views).abs().mean() < 0.02
        assert (x.local_views - y.local_views).abs().mean() < 0.02
    with pytest.raises(ValueError, match="concurrency"):
        DALITuning(concurrency="some")


def test_tuning_from_a_config_reaches_the_loader(indexed: list[tuple[str, int]], capsys: pytest.CaptureFixture[str]) -> None:
    """data.dali_tuning / --dali-tuning: "key=value,..." over DALITuning, typed by its fields;
    every mistake is a one-line error naming the fields."""
    from mveb.cli import main
    from pipeline.loaders import build_loader

    loader = build_loader("dali", indexed, RECIPE, 8, dali_tuning=" prefetch=2, blur=conditional,stack_locals=false ")
    assert loader.tuning == DALITuning(prefetch=2, blur="conditional", stack_locals=False)
    assert len(next(iter(loader)).labels) == 8
    assert build_loader("dali", indexed, RECIPE, 8).tuning == DALITuning()
    for text, message in [("prefetch", "use key=value"), ("speed=3", "hw_decoder_load, prefetch"),
                          ("prefetch=two", "expected int"), ("hw_decoder_load=2", "within [0, 1]"),
                          ("stack_locals=maybe", "expected bool")]:
        with pytest.raises(UsageError, match=message.replace("[", r"\[")):
            DALITuning.from_text(text)
    with pytest.raises(UsageError, match="dali only"):
        build_loader("torch", indexed, RECIPE, 8, dali_tuning="prefetch=2")
    capsys.readouterr()
    assert main(["bench", "loader", "--data", str(Path(indexed[0][0]).parents[1]), "--backends", "dali",
                 "--dali-tuning", "prefetch=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "prefetch must be at least 1" in err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_output(indexed: list[tuple[str, int]], dtype: torch.dtype) -> None:
    half = next(iter(DALIMultiCropLoader(indexed, TINY, 4, dtype=dtype)))
    full = next(iter(DALIMultiCropLoader(indexed, TINY, 4)))
    half.check(TINY, 4)
    assert half.global_views.dtype == dtype and half.local_views.dtype == dtype
    tol = 0.02 if dtype == torch.float16 else 0.05
    assert torch.allclose(half.global_views.float(), full.global_views, atol=tol)


def test_same_seed_same_batches_other_seed_other_augmentations(indexed: list[tuple[str, int]]) -> None:
    a = _epoch(DALIMultiCropLoader(indexed, TINY, 4, seed=5))
    b = _epoch(DALIMultiCropLoader(indexed, TINY, 4, seed=5))
    c = _epoch(DALIMultiCropLoader(indexed, TINY, 4, seed=6))
    assert all(_same(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0].global_views, c[0].global_views)


def test_ranks_read_disjoint_shards_with_equal_epoch_lengths(indexed: list[tuple[str, int]]) -> None:
    seen = []
    for rank in (0, 1):
        loader = DALIMultiCropLoader(indexed, TINY, 4, rank=rank, world_size=2)
        assert len(loader) == (37 // 2) // 4  # the same on both ranks although shards are 18 and 19
        epochs = [[y for b in _epoch(loader) for y in b.labels.tolist()] for _ in range(2)]
        assert [len(e) for e in epochs] == [len(loader) * 4] * 2
        assert all(len(set(e)) == len(e) for e in epochs)  # no padding repeats inside an epoch
        assert epochs[0] != epochs[1]  # a new order every epoch
        seen.append(set(epochs[0]) | set(epochs[1]))
    assert not seen[0] & seen[1]


def test_ranks_draw_different_augmentations(indexed: list[tuple[str, int]]) -> None:
    # Every file is the same photo: only the augmentation draws can tell the ranks apart.
    one = [(indexed[0][0], i) for i in range(16)]
    r0, r1 = (next(iter(DALIMultiCropLoader(one, TINY, 4, rank=r, world_size=2))) for r in (0, 1))
    assert not torch.equal(r0.global_views, r1.global_views)


def test_resume_mid_epoch_equals_uninterrupted(indexed: list[tuple[str, int]]) -> None:
    whole = DALIMultiCropLoader(indexed, RECIPE, 4, seed=1)
    ref = _epoch(whole) + _epoch(whole)[:3]
    for stop in (5, len(whole)):  # mid-epoch, and right after an epoch's last batch
        first = DALIMultiCropLoader(indexed, RECIPE, 4, seed=1)
        it = iter(first)
        assert all(_same(next(it), ref[k]) for k in range(stop))
        buf = io.BytesIO()
        torch.save(first.state_dict(), buf)
        buf.seek(0)
        resumed = DALIMultiCropLoader(indexed, RECIPE, 4, seed=1)
        resumed.load_state_dict(torch.load(buf, weights_only=True))
        rest = _epoch(resumed) + _epoch(resumed)[:3] if stop < len(whole) else _epoch(resumed)[:3]
        assert len(rest) == len(ref) - stop
        assert all(_same(x, y) for x, y in zip(rest, ref[stop:]))


def test_state_from_another_split_restarts_the_epoch(indexed: list[tuple[str, int]]) -> None:
    saved = DALIMultiCropLoader(indexed, TINY, 4)
    next(iter(saved))
    other = DALIMultiCropLoader(indexed, TINY, 4, rank=1, world_size=2)
    other.load_state_dict(saved.state_dict())
    assert (other.epoch, other.batches_done) == (0, 0)
    assert len(_epoch(other)) == len(other)


def test_set_epoch_mid_epoch_skips_to_the_new_epoch(indexed: list[tuple[str, int]]) -> None:
    loader = DALIMultiCropLoader(indexed, TINY, 4)
    ref = DALIMultiCropLoader(indexed, TINY, 4)
    _epoch(ref)
    next(iter(loader))
    loader.set_epoch(1)
    assert (loader.epoch, loader.batches_done) == (1, 0)
    assert all(_same(x, y) for x, y in zip(_epoch(loader), _epoch(ref)))


def test_last_partial_batch_kept_without_drop_last(indexed: list[tuple[str, int]]) -> None:
    loader = DALIMultiCropLoader(indexed, TINY, 4, rank=1, world_size=2, drop_last=False)
    batches = _epoch(loader)
    assert len(batches) == len(loader) == 5  # shard of 19
    last = batches[-1]
    last.check(TINY, 3)
    labels = [y for b in batches for y in b.labels.tolist()]
    assert len(labels) == 19 == len(set(labels))


def test_broken_files_are_left_out_and_reported(photo_train: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "data"
    for cls in sorted(p.name for p in photo_train.iterdir())[:2]:
        shutil.copytree(photo_train / cls, root / cls)
    good = sorted(root.glob("*/*.jpg"))
    good[0].write_bytes(good[0].read_bytes()[:300])  # truncated JPEG
    (root / good[1].parent.name / "empty.jpg").write_bytes(b"")
    (root / good[1].parent.name / "text.JPEG").write_text("not an image")
    # PIL decodes these, DALI stops the run on them (it once passed the scan, then
    # DALI's first batch said "run `mveb validate` again", which found nothing)
    photo = Image.open(good[2]).convert("RGB")
    photo.save(root / good[1].parent.name / "gif.jpg", format="GIF")
    photo.save(root / good[1].parent.name / "targa.jpg", format="TGA")
    photo.convert("1").save(root / good[1].parent.name / "bilevel.jpg", format="TIFF")
    loader = DALIMultiCropLoader(root, TINY, 8)
    left_out = ["empty.jpg", "text.JPEG", "gif.jpg", "targa.jpg", "bilevel.jpg"]
    assert sorted(Path(p).name for p, _ in loader.skipped) == sorted([good[0].name] + left_out)
    assert "6 file(s) cannot be decoded" in capsys.readouterr().err
    reasons = {Path(p).name: why for p, why in loader.skipped}
    assert "GIF" in reasons["gif.jpg"] and "1-bit TIFF" in reasons["bilevel.jpg"], reasons
    assert len(_epoch(loader)) == len(loader) == (len(good) - 1) // 8


def test_a_folder_no_file_of_which_decodes_is_named_so(tmp_path: Path) -> None:
    for i in range(8):  # once "0 images make no full batch ...; lower the batch size"
        (tmp_path / "a").mkdir(exist_ok=True)
        (tmp_path / "a" / f"{i}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UsageError, match=r"none of the 8 images can be decoded \(the first is .*/a/0.jpg\)"):
        DALIMultiCropLoader(tmp_path, TINY, 4)


def test_a_file_broken_after_validation_is_a_clear_error(indexed: list[tuple[str, int]], tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(indexed[0][0]).read_bytes()[:300])
    loader = DALIMultiCropLoader(indexed[1:8] + [(str(broken), 0)], TINY, 4)
    with pytest.raises(UsageError, match="run `mveb validate"):
        for _ in range(3):
            _epoch(loader)


def test_validation_report_spares_the_decode_while_it_matches_the_folder(photo_train: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(photo_train / "china", root / "china")
    validate(root, workers=1)
    report = tmp_path / "data.validate.json"
    verdict = json.loads(report.read_text())
    first = sorted(root.glob("*/*.jpg"))[0]
    verdict["bad"] = [{"path": str(first), "reason": "marked bad by hand"}]
    report.write_text(json.dumps(verdict))
    # The report is believed (no decode would find this photo broken) ...
    assert DALIMultiCropLoader(root, TINY, 4).skipped == [(str(first), "marked bad by hand")]
    # ... until the folder no longer holds the files it describes.
    shutil.copy(first, root / "china" / "new.jpg")
    assert DALIMultiCropLoader(root, TINY, 4).skipped == []


def test_a_scan_is_kept_and_believed_until_the_folder_changes(photo_train: Path, tmp_path: Path) -> None:
    """Without `mveb validate`'s report, the first loader decodes the folder and keeps what it
    found; the next one (another rank, a requeued job) reads that instead of decoding again."""
    root = tmp_path / "data"
    shutil.copytree(photo_train / "china", root / "china")
    assert DALIMultiCropLoader(root, TINY, 4).skipped == []
    kept = kept_report(root)
    verdict = json.loads(kept.read_text())
    first = sorted(root.glob("*/*.jpg"))[0]
    verdict["bad"] = [{"path": str(first), "reason": "marked bad by hand"}]
    kept.write_text(json.dumps(verdict))
    assert DALIMultiCropLoader(root, TINY, 4).skipped == [(str(first), "marked bad by hand")]
    time.sleep(0.01)  # a new file changes the class folder's mtime: the kept scan is stale
    shutil.copy(first, root / "china" / "new.jpg")
    assert DALIMultiCropLoader(root, TINY, 4).skipped == []


def test_validate_on_a_read_only_dataset_keeps_its_report_where_dali_reads_it(
        photo_train: Path, small_disk: Callable[[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    disk = small_disk("20m")
    root = disk / "data"
    shutil.copytree(photo_train / "china", root / "china")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)  # a read-only dataset mount
    validate(root, workers=1)
    assert "the report is kept in the cache instead" in capsys.readouterr().out
    kept = kept_report(root)
    verdict = json.loads(kept.read_text())
    first = sorted(root.glob("*/*.jpg"))[0]
    verdict["bad"] = [{"path": str(first), "reason": "marked bad by hand"}]
    kept.write_text(json.dumps(verdict))
    assert DALIMultiCropLoader(root, TINY, 4).skipped == [(str(first), "marked bad by hand")]  # read, not redone


def test_an_unwritable_cache_costs_a_warning_not_the_loader(photo_train: Path, tmp_path: Path,
                                                            small_disk: Callable[[str], Path],
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    cache = small_disk("1m")
    subprocess.run(["mount", "-o", "remount,ro", str(cache)], check=True)
    monkeypatch.setenv("MVEB_CACHE_DIR", str(cache))
    root = tmp_path / "data"
    shutil.copytree(photo_train / "china", root / "china")
    loader = DALIMultiCropLoader(root, TINY, 4)
    next(iter(loader)).check(TINY, 4)
    err = capsys.readouterr().err
    assert "is not writable (Read-only file system)" in err and "is not kept" in err


@pytest.mark.slow
def test_ranks_starting_together_scan_the_folder_once(tmp_path: Path) -> None:
    """Each process reports the inode of the kept scan it got; a second scan would have
    replaced the file, so all must be the final one."""
    # ImageNet-size photos, so the scan (seconds) outlasts the processes' start-up differences.
    root = build_photo_folder(tmp_path / "photos", per_class_train=16, per_class_val=0, side=500) / "train"
    code = ("import os, sys; from pathlib import Path; from pipeline.dali_loader import resolve_dali_samples; "
            "from pipeline.validate import kept_report; resolve_dali_samples(sys.argv[1], 1); "
            "print(os.stat(kept_report(Path(sys.argv[1]))).st_ino)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    kept = kept_report(root)
    assert [int(out) for out, _ in results] == [kept.stat().st_ino] * 3


def test_paths_with_spaces(tmp_path: Path, indexed: list[tuple[str, int]]) -> None:
    odd = tmp_path / "with space"
    odd.mkdir()
    shutil.copy(indexed[0][0], odd / "a b.jpg")
    samples = [(str(odd / "a b.jpg"), 7)] + indexed[1:8]
    batch = next(iter(DALIMultiCropLoader(samples, TINY, 8)))
    assert sorted(batch.labels.tolist()) == sorted(y for _, y in samples)


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 64}, "no full batch"),
    ({"batch_size": 4, "rank": 2, "world_size": 2}, "outside world size"),
    ({"batch_size": 4, "dtype": torch.uint8}, "float32, float16 or bfloat16"),
    ({"batch_size": 4, "device": "mps"}, "cpu or cuda"),
])
def test_user_errors(indexed: list[tuple[str, int]], kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        DALIMultiCropLoader(indexed[:37], TINY, **kwargs)


def test_bad_paths_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        DALIMultiCropLoader(tmp_path / "missing", TINY, 4)
    with pytest.raises(UsageError, match="no class subfolders"):
        DALIMultiCropLoader(tmp_path, TINY, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_mixed_decode_follows_the_contract(photo_train: Path, dtype: torch.dtype) -> None:
    loader = DALIMultiCropLoader(photo_train, RECIPE, 16, device="cuda", dtype=dtype)
    batches = _epoch(loader)
    assert len(batches) == len(loader)
    for b in batches[:2]:
        b.check(RECIPE, 16)
        assert b.global_views.is_cuda and b.labels.is_cuda and b.global_views.dtype == dtype
        assert torch.isfinite(b.global_views.float()).all() and torch.isfinite(b.local_views.float()).all()
    # The GPU graph is the CPU graph: pixel statistics over an epoch agree.
    cpu = _epoch(DALIMultiCropLoader(photo_train, RECIPE, 16))
    for name in ("global_views", "local_views"):
        g = torch.cat([getattr(b, name).float().cpu() for b in batches])
        c = torch.cat([getattr(b, name) for b in cpu])
        assert abs(g.mean() - c.mean()) < 0.1 and abs(g.std() - c.std()) < 0.1


@pytest.mark.gpu
def test_gpu_resume_equals_uninterrupted(indexed: list[tuple[str, int]]) -> None:
    ref = _epoch(DALIMultiCropLoader(indexed, RECIPE, 4, device="cuda", seed=2))
    first = DALIMultiCropLoader(indexed, RECIPE, 4, device="cuda", seed=2)
    it = iter(first)
    for _ in range(3):
        next(it)
    resumed = DALIMultiCropLoader(indexed, RECIPE, 4, device="cuda", seed=2)
    resumed.load_state_dict(first.state_dict())
    rest = _epoch(resumed)
    assert len(rest) == len(ref) - 3
    for x, y in zip(rest, ref[3:]):
        # Same files, crops and draws; a few levels of slack in case the hardware and the
        # CUDA JPEG decoders split the batch differently (a wrong crop differs by far more).
        assert torch.equal(x.labels, y.labels)
        assert (x.global_views - y.global_views).abs().mean() < 0.02
        assert (x.local_views - y.local_views).abs().mean() < 0.02
