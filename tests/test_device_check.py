"""tools/device_check.sh: DALI's parts, carried one per call into fresh tree copies, join or say what is missing."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _packed(parts: int) -> tuple[list[bytes], str, dict[str, bytes]]:
    """A tar of two fake wheels split like tools/pack_dali.sh splits, and the tar's sha256."""
    files = {"a-1.0-py3-none-any.whl": os.urandom(3000), "b-2.0-py3-none-any.whl": os.urandom(5000)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    whole = buf.getvalue()
    size = -(-len(whole) // parts)
    return [whole[i:i + size] for i in range(0, len(whole), size)], hashlib.sha256(whole).hexdigest(), files


def _call(tmp_path: Path, name: str, arg: str, carried: dict[str, bytes]) -> subprocess.CompletedProcess:
    """One device call: a fresh copy of tools/ plus the carried .dali files, the shared /tmp-like dir kept."""
    tree = tmp_path / name
    shutil.copytree(REPO / "tools", tree / "tools")
    (tree / ".dali").mkdir()
    for fname, data in carried.items():
        (tree / ".dali" / fname).write_bytes(data)
    env = {**os.environ, "MVEB_DEVICE_DIR": str(tmp_path / "keep"), "OUT": str(tmp_path / "out"),
           "PYTHON": "false"}  # stops gpu_check.sh right after the unpack: no pip, no CUDA needed
    (tmp_path / "out").mkdir(exist_ok=True)
    return subprocess.run(["bash", "tools/device_check.sh", arg], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=60)


def test_parts_join_only_when_all_are_stashed(tmp_path: Path) -> None:
    parts, digest, files = _packed(3)
    assert _call(tmp_path, "c0", "stash", {"p0": parts[0], "SHA256": (digest + "\n").encode()}).returncode == 0
    assert _call(tmp_path, "c1", "stash", {"p1": parts[1]}).returncode == 0
    early = _call(tmp_path, "c2", "A", {})
    assert early.returncode == 1 and "do not join" in early.stdout and "p0 p1" in early.stdout
    assert not (tmp_path / "keep" / "wheels").exists()

    assert _call(tmp_path, "c3", "stash", {"p2": parts[2]}).returncode == 0
    done = _call(tmp_path, "c4", "A", {})
    wheels = tmp_path / "keep" / "wheels"
    assert {p.name: p.read_bytes() for p in wheels.iterdir()} == files
    assert "phase A:" in done.stdout  # it went on to the check itself, which `false` as python ends
    assert (tmp_path / "out" / "gpu-check").is_dir()


def test_stash_without_a_part_says_so(tmp_path: Path) -> None:
    r = _call(tmp_path, "c0", "stash", {})
    assert r.returncode == 1 and "no .dali/p*" in r.stdout
    assert _call(tmp_path, "c1", "C", {}).returncode == 2
