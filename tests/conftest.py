"""Shared fixtures: real photos (the demo set), a real small filesystem, and the gpu/slurm markers' skip rules."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_gpu = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    no_slurm = pytest.mark.skip(reason="local SLURM cluster is not up (run slurm/cluster/up.sh, or make test)")
    slurm_up = _slurm_up()
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "slurm" in item.keywords and not slurm_up:
            item.add_marker(no_slurm)


def _slurm_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s.strip() in ("idle", "mix", "alloc") for s in out.stdout.split())


@pytest.fixture(scope="session")
def photo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo real-photo set: root/train/<class>/*.jpg and root/val/<class>/*.jpg."""
    from pipeline.demo_photos import build_photo_folder

    return build_photo_folder(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="session")
def photo_train(photo_root: Path) -> Path:
    return photo_root / "train"


@pytest.fixture(autouse=True, scope="session")
def _data_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """What loaders keep (FFCV shards of folders, DALI's scans) goes to a temporary cache, not ~/.cache."""
    os.environ["MVEB_CACHE_DIR"] = str(tmp_path_factory.mktemp("mveb-cache"))


@pytest.fixture(autouse=True, scope="session")
def _quiet_threads() -> None:
    # Two cores here: keep torch from oversubscribing when loaders spawn workers.
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """small_disk("200m"): a real tmpfs of that size (a full disk without filling this one's);
    called again, it resizes the same filesystem, as a user freeing space would. Needs root."""
    disk = tmp_path / "disk"
    disk.mkdir()

    def mount(size: str) -> Path:
        options = f"remount,size={size}" if os.path.ismount(disk) else f"size={size}"
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(disk)], capture_output=True).returncode:
            pytest.skip("mounting a tmpfs needs root")
        return disk

    yield mount
    if os.path.ismount(disk):
        subprocess.run(["umount", "-l", str(disk)], check=True)


@pytest.fixture(params=["under a file", "in /proc"])
def unwritable(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str], Path]:
    """unwritable("out.json"): a path no command can write, below a file or in /proc (which
    refuses even root), for the tests that an output is refused before the work, not after."""
    (tmp_path / "a-file").write_text("")
    base = tmp_path / "a-file" if request.param == "under a file" else Path("/proc/mveb-test")
    return lambda name: base / name


@pytest.fixture
def unprivileged() -> list[str]:
    """A command prefix under which a read-only folder refuses writes: as root, setpriv drops
    the override of file permissions (as a sandbox or a root-squashed NFS does)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("as root, a read-only folder needs setpriv to drop CAP_DAC_OVERRIDE")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Callable[[object, str], list]:
    """calls(module, "fn"): the first argument of each call of module.fn from now on, which
    still runs; to see what a command did, or that it stopped before doing it."""
    def record(module: object, name: str) -> list:
        seen: list = []
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda first, *a, **k: seen.append(first) or real(first, *a, **k))
        return seen
    return record
