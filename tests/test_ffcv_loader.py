"""FFCVMultiCropLoader on a real shard of real photos: contract, seeding, resume, ranks.

One compiled loader serves most tests (the first batch compiles the numba pipeline); a
second one, rank 1 of 2, checks that a sample's views do not depend on who reads it.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from ffcv.reader import Reader

from mveb.errors import UsageError
from pipeline import cache, ffcv_loader
from pipeline.batch import MultiCropBatch, MultiCropLoader
from pipeline.demo_photos import build_photo_folder
from pipeline.cache import cache_name
from pipeline.ffcv_loader import SHARD_QUALITY, FFCVMultiCropLoader
from pipeline.recipe import SHARD_MAX_RES, MultiCropRecipe
from pipeline.shards import build_shard
from pipeline.torch_loader import TorchMultiCropLoader

RECIPE = MultiCropRecipe().with_views(2, 64, 2, 32)
BATCH = 16


@pytest.fixture(scope="session")
def ffcv_shard(photo_train: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ffcv") / "train.beton"
    build_shard(photo_train, out, workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def shard_labels(ffcv_shard: Path) -> np.ndarray:
    return Reader(str(ffcv_shard)).metadata["f1"].astype(np.int64)


@pytest.fixture(scope="session")
def loader(ffcv_shard: Path) -> FFCVMultiCropLoader:
    return FFCVMultiCropLoader(ffcv_shard, RECIPE, BATCH, workers=2, seed=0)


@pytest.fixture(scope="session")
def epoch0(loader: FFCVMultiCropLoader) -> list[MultiCropBatch]:
    loader.load_state_dict({"epoch": 0, "batches_done": 0, "seed": 0})
    return list(loader)


def same(a: MultiCropBatch, b: MultiCropBatch) -> bool:
    return (torch.equal(a.global_views, b.global_views) and torch.equal(a.local_views, b.local_views)
            and torch.equal(a.labels, b.labels))


def test_batches_follow_the_contract(loader: FFCVMultiCropLoader, epoch0: list[MultiCropBatch]) -> None:
    assert len(epoch0) == len(loader) == loader.num_samples // BATCH
    lo = [(0 - m) / s for m, s in zip(RECIPE.mean, RECIPE.std)]
    hi = [(1 - m) / s for m, s in zip(RECIPE.mean, RECIPE.std)]
    for b in epoch0:
        b.check(RECIPE, BATCH)
        assert b.global_views.dtype == torch.float32 and b.labels.dtype == torch.int64
        for t in (b.global_views, b.local_views):
            per_channel = t.transpose(0, 1).reshape(3, -1)
            assert (per_channel.min(1).values >= torch.tensor(lo) - 1e-4).all()
            assert (per_channel.max(1).values <= torch.tensor(hi) + 1e-4).all()
    allg = torch.cat([b.global_views for b in epoch0])
    assert -1.0 < allg.mean().item() < 1.0 and 0.5 < allg.std().item() < 1.5  # normalized, not constant


def test_views_are_grouped_view_major(epoch0: list[MultiCropBatch]) -> None:
    """Global view 1 and view 2 of a sample are different crops of the same photo."""
    g1, g2 = epoch0[0].views(2, 2)[:2]
    assert not torch.equal(g1, g2)
    # Crops of one photo share colour statistics far more than crops of different photos.
    m1, m2 = g1.mean((2, 3)), g2.mean((2, 3))
    same_photo = (m1 - m2).abs().mean().item()
    other_photo = (m1 - m2.roll(1, 0)).abs().mean().item()
    assert same_photo < other_photo


def test_order_is_the_seeded_permutation(loader: FFCVMultiCropLoader, epoch0: list[MultiCropBatch],
                                         shard_labels: np.ndarray) -> None:
    order = loader.epoch_order(0)
    got = torch.cat([b.labels for b in epoch0]).numpy()
    np.testing.assert_array_equal(got, shard_labels[order.astype(np.int64)])
    assert not np.array_equal(order, np.sort(order))
    assert not np.array_equal(order, loader.epoch_order(1))


def test_same_seed_replays_and_resumes_mid_epoch(loader: FFCVMultiCropLoader, epoch0: list[MultiCropBatch]) -> None:
    loader.load_state_dict({"epoch": 0, "batches_done": 0, "seed": 0})
    it = iter(loader)
    head = [next(it) for _ in range(5)]
    assert all(same(a, b) for a, b in zip(head, epoch0))
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches_done": 5, "seed": 0}
    # A fresh iterator (as after a restart with load_state_dict) continues where it stopped.
    loader.load_state_dict(state)
    rest = list(loader)
    assert len(rest) == len(epoch0) - 5
    assert all(same(a, b) for a, b in zip(rest, epoch0[5:]))
    assert loader.state_dict() == {"epoch": 1, "batches_done": 0, "seed": 0}


def test_next_epoch_differs(loader: FFCVMultiCropLoader, epoch0: list[MultiCropBatch]) -> None:
    loader.set_epoch(1)
    first = next(iter(loader))
    assert not torch.equal(first.global_views, epoch0[0].global_views)
    assert loader.state_dict()["epoch"] == 1


@pytest.mark.slow
def test_rank_views_match_single_process(ffcv_shard: Path, loader: FFCVMultiCropLoader,
                                         epoch0: list[MultiCropBatch]) -> None:
    """Rank 1 of 2 yields its half of the permutation, and each sample's views equal the
    views the single-process loader made for it: augmentation is keyed by sample, not reader."""
    r1 = FFCVMultiCropLoader(ffcv_shard, RECIPE, BATCH, workers=2, seed=0, rank=1, world_size=2)
    r0_order = FFCVMultiCropLoader(ffcv_shard, RECIPE, BATCH, workers=1, seed=0, rank=0, world_size=2).epoch_order(0)
    o1 = r1.epoch_order(0)
    assert len(set(o1.tolist()) & set(r0_order.tolist())) == 0
    assert len(o1) == len(r0_order) == len(r1) * BATCH
    batch = next(iter(r1))
    full = loader.epoch_order(0).tolist()
    g_all = torch.cat([b.views(2, 2)[0] for b in epoch0])
    l_all = torch.cat([b.views(2, 2)[3] for b in epoch0])
    for k, sample in enumerate(o1[:BATCH].tolist()):
        pos = full.index(sample)
        assert torch.equal(batch.views(2, 2)[0][k], g_all[pos])
        assert torch.equal(batch.views(2, 2)[3][k], l_all[pos])


def test_rank_shards_partition_each_epoch(ffcv_shard: Path) -> None:
    n = Reader(str(ffcv_shard)).num_samples
    for world in (2, 3):
        loaders = [FFCVMultiCropLoader(ffcv_shard, RECIPE, 8, seed=3, rank=r, world_size=world) for r in range(world)]
        for epoch in (0, 1):
            orders = [ld.epoch_order(epoch) for ld in loaders]
            joined = np.concatenate(orders)
            assert len(set(joined.tolist())) == len(joined)  # no sample on two ranks
            assert len({len(o) for o in orders}) == 1  # equal step counts keep DDP in lockstep
            assert len(joined) > n - world * 8  # at most a partial batch per rank is left out


def test_bad_inputs_are_usage_errors(ffcv_shard: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        FFCVMultiCropLoader(tmp_path / "missing.beton", RECIPE, 8)
    junk = tmp_path / "junk.beton"
    junk.write_bytes(b"not a shard" * 100)
    with pytest.raises(UsageError, match="not a complete FFCV shard"):
        FFCVMultiCropLoader(junk, RECIPE, 8)
    truncated = tmp_path / "cut.beton"
    truncated.write_bytes(ffcv_shard.read_bytes()[: ffcv_shard.stat().st_size // 2])
    with pytest.raises(UsageError):
        FFCVMultiCropLoader(truncated, RECIPE, 8)
    with pytest.raises(UsageError, match="fewer than one batch"):
        FFCVMultiCropLoader(ffcv_shard, RECIPE, 100_000)
    with pytest.raises(UsageError, match="rank"):
        FFCVMultiCropLoader(ffcv_shard, RECIPE, 8, rank=2, world_size=2)
    ld = FFCVMultiCropLoader(ffcv_shard, RECIPE, 8, seed=1)
    with pytest.raises(UsageError, match="seed"):
        ld.load_state_dict({"epoch": 0, "batches_done": 0, "seed": 2})


def test_more_workers_than_cpus_run_with_the_cpus_there_are(ffcv_shard: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """data.workers=8 (the preset) on a smaller node: numba refuses more threads than CPUs."""
    usable = len(os.sched_getaffinity(0))
    ld = FFCVMultiCropLoader(ffcv_shard, RECIPE, BATCH, workers=usable + 6, seed=0)
    next(iter(ld)).check(RECIPE, BATCH)
    assert f"{usable + 6} FFCV workers asked for, {usable} CPUs usable here; using {usable}" in capsys.readouterr().err


@pytest.mark.slow
def test_image_folder_is_sharded_once_into_the_cache(photo_train: Path, tmp_path: Path) -> None:
    name = cache_name(photo_train.resolve(), SHARD_MAX_RES, SHARD_QUALITY)
    killed = tmp_path / f".{name}.beton.tmp-99999"  # what a SIGKILLed build leaves
    killed.write_bytes(b"\0" * 4096)
    # workers=0 (data.workers=0, which the torch loader reads as "decode in the training
    # process") once failed the build with "--workers must be at least 1"
    ld = FFCVMultiCropLoader(photo_train, RECIPE, 8, cache_dir=tmp_path, workers=0)
    assert not killed.exists()
    shards = list(tmp_path.glob("*.beton"))
    assert shards == [ld.path] and ld.num_samples == sum(1 for _ in photo_train.rglob("*.jpg"))
    stamp = ld.path.stat().st_mtime_ns
    again = FFCVMultiCropLoader(photo_train, RECIPE, 8, cache_dir=tmp_path)
    assert again.path == ld.path and again.path.stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_without_locks_a_build_leaves_other_builds_temporary_files(photo_train: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A filesystem without flock (Lustre without -o flock, NFS nolock): the ranks build side by
    side, so none may delete another's temporary file (FFCV's writer reopens it by name)."""
    def no_locks(*_: object) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(cache.fcntl, "flock", no_locks)
    name = cache_name(photo_train.resolve(), SHARD_MAX_RES, SHARD_QUALITY)
    beside = tmp_path / f".{name}.beton.tmp-99999"  # another rank's build in progress
    beside.write_bytes(b"\0" * 4096)
    ld = FFCVMultiCropLoader(photo_train, RECIPE, 8, cache_dir=tmp_path)
    assert beside.exists() and ld.path.exists()
    assert "cannot be locked" in capsys.readouterr().err


def test_another_users_lock_file_in_a_shared_cache_still_locks(tmp_path: Path) -> None:
    """A group cache where another user made the lock file (mode 0644): flock needs only a read
    descriptor, so this build still waits its turn instead of building unlocked beside theirs.
    Root without CAP_DAC_OVERRIDE meets the file's mode as any other user would."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop the permission override")
    target = tmp_path / "train.beton"
    lock = tmp_path / f".{target.name}.lock"
    lock.touch(mode=0o444)
    code = ("import sys; from pathlib import Path; from pipeline.cache import build_lock\n"
            "with build_lock(Path(sys.argv[1])) as locked: print(locked)")
    done = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c", code,
                           str(target)], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "True\n", "")


def _mean_gradients(loader: MultiCropLoader, epochs: int) -> torch.Tensor:
    """Mean absolute horizontal gradient of the global and of the local views (sharpness)."""
    sums = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        sums += [[(t[..., 1:] - t[..., :-1]).abs().mean() for t in (b.global_views, b.local_views)] for b in loader]
    return torch.tensor(sums).mean(0)


@pytest.mark.slow
def test_default_shard_keeps_imagenet_size_photos_as_sharp_as_the_reference(tmp_path: Path) -> None:
    """Crops of a default shard are as sharp as the torchvision reference's crops of the JPEGs.
    On 500-px photos (ImageNet's size) a 256-px shard made the global views' gradient 17.5%
    lower and the locals' 10% (upsampled crops); the default shard measured within 2.1%."""
    photos = build_photo_folder(tmp_path / "photos", per_class_train=16, per_class_val=0, side=500) / "train"
    shard = tmp_path / "train.beton"
    build_shard(photos, shard, workers=2, progress=False)
    recipe = MultiCropRecipe().with_views(2, 224, 2, 96)
    ref = _mean_gradients(TorchMultiCropLoader(photos, recipe, BATCH, workers=2, seed=0), epochs=4)
    got = _mean_gradients(FFCVMultiCropLoader(shard, recipe, BATCH, workers=2, seed=0), epochs=4)
    assert ((got / ref - 1).abs() < 0.07).all(), f"gradient ratio to the reference (global, local): {got / ref}"


def test_a_read_only_shard_cache_is_one_line_saying_what_to_do(photo_train: Path,
                                                               small_disk: Callable[[str], Path]) -> None:
    cache = small_disk("1m")
    subprocess.run(["mount", "-o", "remount,ro", str(cache)], check=True)
    with pytest.raises(UsageError, match="Read-only file system.*set MVEB_CACHE_DIR to a writable folder"):
        FFCVMultiCropLoader(photo_train, RECIPE, 8, cache_dir=cache / "shards")


def test_an_existing_read_only_shard_cache_fails_before_decoding(photo_train: Path,
                                                                small_disk: Callable[[str], Path],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache folder is there (made by an earlier job) but now read-only: one line before the
    build, not a traceback from FFCV's writer after decoding the whole set."""
    cache = small_disk("1m")
    (cache / "shards").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(cache)], check=True)
    monkeypatch.setattr(ffcv_loader, "build_shard", lambda *a, **k: pytest.fail("built into a read-only cache"))
    with pytest.raises(UsageError, match="Read-only file system.*set MVEB_CACHE_DIR to a writable folder"):
        FFCVMultiCropLoader(photo_train, RECIPE, 8, cache_dir=cache / "shards")


@pytest.mark.slow
def test_processes_starting_together_build_the_cached_shard_once(photo_train: Path, tmp_path: Path) -> None:
    """The ranks of a DDP job on an ImageFolder all ask for its shard at once: one builds, the
    others wait for it. A second build would replace the file: each process reports the inode it
    got, and all must be the final one."""
    code = ("import os, sys; from pipeline.ffcv_loader import cached_shard; "
            "p = cached_shard(sys.argv[1], sys.argv[2], workers=1); print(os.stat(p).st_ino)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(photo_train), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    (shard,) = tmp_path.glob("*.beton")
    assert [int(out) for out, _ in results] == [shard.stat().st_ino] * 3


@pytest.mark.gpu
def test_cuda_batches_equal_cpu_batches(ffcv_shard: Path, epoch0: list[MultiCropBatch]) -> None:
    gpu = FFCVMultiCropLoader(ffcv_shard, RECIPE, BATCH, device="cuda", workers=2, seed=0)
    b = next(iter(gpu))
    b.check(RECIPE, BATCH)
    assert b.global_views.is_cuda and b.labels.is_cuda
    torch.testing.assert_close(b.global_views.cpu(), epoch0[0].global_views, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.local_views.cpu(), epoch0[0].local_views, atol=1e-5, rtol=1e-5)
    half = FFCVMultiCropLoader(ffcv_shard, RECIPE, BATCH, device="cuda", dtype=torch.bfloat16, workers=2, seed=0)
    hb = next(iter(half))
    hb.check(RECIPE, BATCH)
    assert hb.global_views.dtype == torch.bfloat16
    torch.testing.assert_close(hb.global_views.float().cpu(), epoch0[0].global_views, atol=0.05, rtol=0.02)
