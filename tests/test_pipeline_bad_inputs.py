"""Validation and shard building on real awkward files: every decodable kind is written as
upright 8-bit RGB, every undecodable one is reported, user errors exit 2 without a traceback,
and nothing is ever left under a final name after a failure."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mveb.cli import main
from mveb.errors import UsageError
from pipeline.images import list_image_folder
from pipeline.loaders import build_loader, check_data
from pipeline.recipe import MultiCropRecipe
from pipeline.shards import build_shard, check_beton, write_beton
from pipeline.validate import read_fix_list, scan

# name -> expected (height, width) in the shard at max_res 256, for the decodable kinds
DECODABLE = {
    "a/gray.jpg": (120, 160),
    "a/cmyk.jpg": (100, 100),
    "a/sixteen_bit.png": (64, 64),
    "a/png_inside.jpg": (50, 70),
    "a/tiny.jpg": (1, 2),
    "a/huge.jpg": (256, 256),
    "a/exif_rotated.jpg": (160, 90),  # stored 160 wide x 90 high, upright it is 90 wide
    "b/rgba.png": (40, 30),
    "b/palette_transparent.png": (32, 32),
    "b/photo.WEBP": (96, 128),
    "b/UPPER.JPEG": (80, 60),
    "b/thin.png": (1, 256),
}
BROKEN = {"b/zero_bytes.jpg": "empty", "b/truncated.jpg": "undecodable", "b/not_an_image.jpg": "not an image",
          # good JPEGs whose names no file list holds (the fix-list and DALI's list once crashed on them)
          "b/line\nbreak.jpg": "line break", "b/latin\udce9.jpg": "not UTF-8"}


def _make_bad_tree(root: Path, photo: Path) -> Path:
    for d in ("a", "b"):
        (root / d).mkdir(parents=True)
    (root / "a" / "notes.txt").write_text("not an image extension: ignored, not reported")
    rgb = Image.open(photo).convert("RGB")
    rgb.resize((160, 120)).convert("L").save(root / "a/gray.jpg")
    rgb.resize((100, 100)).convert("CMYK").save(root / "a/cmyk.jpg")
    Image.fromarray(np.full((64, 64), 32768, np.uint16)).save(root / "a/sixteen_bit.png")
    rgb.resize((70, 50)).save(root / "a/png_inside.jpg", format="PNG")
    rgb.resize((2, 1)).save(root / "a/tiny.jpg")
    Image.new("L", (9600, 9600), 90).save(root / "a/huge.jpg", quality=80)  # 92 Mpx: above PIL's bomb warning
    # Stored 160 wide x 90 high, tagged "rotate 90 degrees clockwise to view" (orientation 6).
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb.resize((160, 90)).save(root / "a/exif_rotated.jpg", exif=exif)
    rgba = rgb.resize((30, 40)).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "b/rgba.png")
    pal = rgb.resize((32, 32)).convert("P")
    pal.save(root / "b/palette_transparent.png", transparency=0)
    rgb.resize((128, 96)).save(root / "b/photo.WEBP", format="WEBP")
    rgb.resize((60, 80)).save(root / "b/UPPER.JPEG", format="JPEG")
    rgb.resize((5000, 20)).save(root / "b/thin.png")  # FFCV's own resizer would make it 0 px high
    (root / "b/zero_bytes.jpg").write_bytes(b"")
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG")
    (root / "b/truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "b/not_an_image.jpg").write_text("<html>404 not found</html>")
    for name in ("b/line\nbreak.jpg", "b/latin\udce9.jpg"):  # \udce9: the byte 0xe9 of a Latin-1 name
        rgb.resize((20, 20)).save(root / name)
    return root


@pytest.fixture(scope="module")
def bad_tree(tmp_path_factory: pytest.TempPathFactory, photo_train: Path) -> Path:
    return _make_bad_tree(tmp_path_factory.mktemp("bad") / "tree", next(photo_train.rglob("*.jpg")))


@pytest.fixture(scope="module")
def shard(bad_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shard") / "bad.beton"
    return out, build_shard(bad_tree, out, max_res=256, workers=2, progress=False)


def _mveb(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process (a subprocess costs a torch import per call on 2 cores)."""
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _rel(root: Path, path: str) -> str:
    return Path(path).relative_to(root).as_posix()


def test_scan_sorts_decodable_from_broken(bad_tree: Path) -> None:
    result = scan(bad_tree, workers=2, progress=False)
    assert result.classes == ["a", "b"]
    assert sorted(_rel(bad_tree, p) for p, _ in result.good) == sorted(DECODABLE)
    reasons = {_rel(bad_tree, p): r for p, r in result.bad}
    assert set(reasons) == set(BROKEN)
    for name, word in BROKEN.items():
        assert word in reasons[name], reasons[name]


@pytest.mark.parametrize("kills", ["every time", "once"])
def test_a_file_that_kills_its_decoding_process_is_found_and_reported(kills: str, photo_train: Path,
                                                                     tmp_path: Path) -> None:
    """A 900 Mpx PNG got a decoding process killed by the kernel's OOM killer: the scan died
    with a BrokenProcessPool traceback naming no file. The kill is real (SIGKILL from inside
    the decode of one file); a process killed once, for no fault of a file, costs nothing."""
    root = tmp_path / "train"
    shutil.copytree(photo_train, root)
    killer = sorted(root.rglob("*.jpg"))[100]
    marker = tmp_path / "killed-once"
    code = ("import json, os, signal, pipeline.validate as v\n"
            "decode = v.why_undecodable\n"
            "def dying(p):\n"
            f"    if p == {str(killer)!r} and ({kills == 'every time'} or not os.path.exists({str(marker)!r})):\n"
            f"        open({str(marker)!r}, 'w').close()\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return decode(p)\n"
            "v.why_undecodable = dying\n"
            f"r = v.scan({str(root)!r}, workers=2, progress=False)\n"
            "print(json.dumps([len(r.good), r.bad]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    good, bad = json.loads(proc.stdout)
    assert "a decoding process died" in proc.stderr
    if kills == "once":
        assert (good, bad) == (288, [])
    else:
        assert good == 287 and [p for p, _ in bad] == [str(killer)], bad
        assert "killed the process (killed by SIGKILL; out of memory?)" in bad[0][1]


def test_validate_cli_writes_report_and_fix_list(bad_tree: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    report, fix = tmp_path / "r.json", tmp_path / "sub" / "good.txt"
    code, out, err = _mveb(capsys, "validate", "--src", str(bad_tree), "--report", str(report), "--fix-list", str(fix),
                           "--workers", "2")
    assert code == 0, err
    assert f"{len(DECODABLE)} decodable, {len(BROKEN)} broken" in out
    data = json.loads(report.read_text())
    assert sorted(_rel(bad_tree, b["path"]) for b in data["bad"]) == sorted(BROKEN)
    lines = fix.read_text().splitlines()
    assert sorted(ln.rsplit(" ", 1)[0] for ln in lines) == sorted(DECODABLE)
    assert all(ln.rsplit(" ", 1)[1] == ("0" if ln.startswith("a/") else "1") for ln in lines)
    assert sorted(p for p, _ in read_fix_list(fix, bad_tree)) == sorted(str(bad_tree / n) for n in DECODABLE)


def _shard_images(path: Path) -> list[tuple[np.ndarray, int]]:
    """Decode every stored JPEG of a shard straight from the file (no numba pipeline)."""
    from ffcv.reader import Reader

    r = Reader(str(path))
    size_at = {int(p): int(s) for _, p, s in r.alloc_table}
    raw = path.read_bytes()
    out = []
    for (mode, w, h, ptr), label in r.metadata:
        img = np.asarray(Image.open(io.BytesIO(raw[ptr:ptr + size_at[int(ptr)]])))
        assert img.shape[:2] == (h, w) and mode == 0  # 0: stored as JPEG
        out.append((img, int(label)))
    return out


def test_shard_holds_every_decodable_image_as_upright_rgb(shard: tuple[Path, dict], bad_tree: Path) -> None:
    out, report = shard
    assert report["written"] == len(DECODABLE)
    assert sorted(_rel(bad_tree, s["path"]) for s in report["skipped"]) == sorted(BROKEN)
    assert report["classes"] == ["a", "b"] and report["seconds"] > 0
    assert json.loads(Path(f"{out}.report.json").read_text()) == report
    check_beton(out)
    images = _shard_images(out)
    # The writer keeps the validator's order: sorted within class folders.
    names = sorted((n for n in DECODABLE), key=lambda n: (n.split("/")[0], n.split("/")[1]))
    written = [_rel(bad_tree, p) for p, _ in list_image_folder(bad_tree)[1] if _rel(bad_tree, p) not in BROKEN]
    by_name = {name: i for i, name in enumerate(written)}
    for name in names:
        img, label = images[by_name[name]]
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8, name
        assert img.shape[:2] == DECODABLE[name], (name, img.shape)
        assert label == (0 if name.startswith("a/") else 1)
    sixteen = images[by_name["a/sixteen_bit.png"]][0]
    assert abs(float(sixteen.mean()) - 128) < 3  # 16-bit mid-grey scaled, not clipped to white
    huge = images[by_name["a/huge.jpg"]][0]
    assert abs(float(huge.mean()) - 90) < 3


def test_limit_and_class_list(bad_tree: Path, tmp_path: Path) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_bytes(b"\xef\xbb\xbfb\r\n")  # as Windows' Notepad saves it: a BOM once made the class "\ufeffb"
    report = build_shard(bad_tree, tmp_path / "b.beton", workers=1, limit=3, classes=classes, progress=False)
    assert report["written"] == 3 and report["classes"] == ["b"]
    assert all(label == 0 for _, label in _shard_images(tmp_path / "b.beton"))


def test_a_killed_write_leaves_nothing_behind(bad_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "never.beton"
    with pytest.raises(RuntimeError, match=r"did not finish within 0.05 s"):  # once "within 0 s"
        build_shard(bad_tree, out, workers=1, timeout_s=0.05, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_fails_at_once_with_its_reason(photo_train: Path, small_disk: Callable[[str], Path]) -> None:
    # FFCV's writer waits forever for a worker that died; the default timeout would be minutes.
    disk = small_disk("1m")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"writer failed \(No space left on device\); nothing was written"):
        build_shard(photo_train, disk / "t.beton", workers=2, progress=False)
    assert time.monotonic() - start < 60
    assert list(disk.iterdir()) == []


def test_a_finished_shard_that_cannot_replace_the_old_one_is_kept(photo_train: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The rename at the very end once failed with a PermissionError traceback, after the
    whole write, and the finished shard was deleted with the temporary files."""
    out = tmp_path / "t.beton"
    out.write_bytes(b"an old shard")
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not possible here (it needs root and a filesystem with attributes)")
    try:
        code, _, err = _mveb(capsys, "shards", "--src", str(photo_train), "--out", str(out), "--workers", "2")
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)
    kept = tmp_path / "t.new.beton"
    assert code == 1 and err.strip().splitlines()[-1] == (
        f"mveb shards: error: the shard is complete but cannot replace {out} (Operation not permitted); "
        f"it is kept as {kept}"), err
    assert out.read_bytes() == b"an old shard"
    check_beton(kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.beton", "t.new.beton"]


def test_a_file_gone_since_the_scan_fails_at_once_naming_it(photo_train: Path, tmp_path: Path) -> None:
    samples = list_image_folder(photo_train)[1][:4] + [(str(tmp_path / "deleted.jpg"), 0)]
    shm_before = set(os.listdir("/dev/shm"))
    with pytest.raises(RuntimeError, match=r"writer failed \(No such file or directory: .*deleted\.jpg"):
        write_beton(tmp_path / "t.beton", samples, 64, 90, workers=1, timeout_s=300, progress=False)
    assert list(tmp_path.iterdir()) == []
    assert set(os.listdir("/dev/shm")) <= shm_before  # the killed writer's metadata segment is freed


def test_user_error_is_one_line_exit_2_without_traceback(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "mveb", "shards", "--src", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "o.beton")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "does not exist" in r.stderr and not (tmp_path / "o.beton").exists()


@pytest.mark.parametrize("kind", ["missing", "empty", "no_class_folders", "only_empty_classes", "file"])
def test_bad_source_folders_exit_2(kind: str, tmp_path: Path, photo_train: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    if kind == "empty":
        src.mkdir()
    elif kind == "no_class_folders":
        src.mkdir()
        shutil.copy(next(photo_train.rglob("*.jpg")), src / "x.jpg")
    elif kind == "only_empty_classes":
        (src / "cls").mkdir(parents=True)
    elif kind == "file":
        src.write_text("x")
    for args in (["validate", "--src", str(src)], ["shards", "--src", str(src), "--out", str(tmp_path / "o.beton")]):
        code, _, err = _mveb(capsys, *args)
        assert code == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and str(src) in err, err
        assert not (tmp_path / "o.beton").exists()
    with pytest.raises(UsageError):
        build_loader("torch", src, MultiCropRecipe().with_views(1, 32, 0, 32), 2)


def _listing(root: Path, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    """list_image_folder(root) in a process of its own, so a walk that never ends fails the test."""
    code = f"from pipeline.images import list_image_folder as f; c, s = f({str(root)!r}); print(c, s)"
    return subprocess.run([*(prefix or []), sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_folder_links_into_the_tree_are_read_once(photo_train: Path, tmp_path: Path) -> None:
    """`ln -s .. up` once put every class under this label, again and again (246 samples of 6
    files), and two `ln -s . x` made the walk never end."""
    root = tmp_path / "src"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            shutil.copy(photo_train / "astronaut" / f"astronaut_{i:04d}.jpg", root / cls / f"{i}.jpg")
    (root / "a" / "up").symlink_to("..")
    (root / "a" / "self").symlink_to(".")
    (root / "a" / "again").symlink_to(".")
    (root / "a" / "b").symlink_to("../b")
    outside = tmp_path / "elsewhere"  # a linked folder outside the tree is read, once
    outside.mkdir()
    shutil.copy(root / "a" / "0.jpg", outside / "x.jpg")
    (root / "b" / "more").symlink_to(outside)
    (root / "b" / "more_again").symlink_to(outside)
    r = _listing(root)
    assert r.returncode == 0, r.stderr
    expected = [(str(root / "a" / f"{i}.jpg"), 0) for i in range(3)] + \
               [(str(root / "b" / "more" / "x.jpg"), 1)] + [(str(root / "b" / f"{i}.jpg"), 1) for i in range(3)]
    assert r.stdout.strip() == f"['a', 'b'] {sorted(expected, key=lambda s: (s[1], s[0]))}"
    assert r.stderr.strip() == f"warning: {root}: skipped 5 folder link(s) to a folder already read (a loop, or " \
                               "another class's folder)"


@pytest.mark.parametrize("folder", ["b", "."])
def test_an_unreadable_folder_is_an_error_not_an_empty_class(folder: str, photo_train: Path, tmp_path: Path,
                                                              unprivileged: list[str]) -> None:
    """A class folder once became a class with no images, and validate said all was well;
    the root was a PermissionError traceback."""
    root = tmp_path / "src"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        shutil.copy(sorted(photo_train.rglob("*.jpg"))[0], root / cls / "0.jpg")
    (root / folder).chmod(0)
    try:
        r = _listing(root, unprivileged)
    finally:
        (root / folder).chmod(0o755)
    says = (f"cannot read {root / 'b'} (Permission denied); its images would be left out" if folder == "b"
            else f"cannot read {root} (Permission denied)")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == f"mveb.errors.UsageError: {says}", r.stderr


def test_an_empty_data_path_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`--src "$DATA"` with DATA unset once scanned the working folder and wrote a report above it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cls").mkdir()
    code, _, err = _mveb(capsys, "validate", "--src", "")
    assert code == 2 and err.strip() == "mveb validate: error: the data path is empty; pass an ImageFolder root " \
                                        "(one subfolder per class)", err
    assert sorted(tmp_path.parent.glob("*.validate.json")) == []


def test_shards_cli_rejects_bad_options(bad_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "dup.txt").write_text("a\na\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))  # once a UnicodeDecodeError traceback
    for extra, says in ((["--quality", "0"], "--quality"), (["--max-res", "2"], "--max-res"), (["--limit", "0"], "--limit"),
                        (["--classes", str(tmp_path / "none")], "cannot read class list"),
                        (["--classes", str(tmp_path / "dup.txt")], "twice"),
                        (["--classes", str(tmp_path / "latin1.txt")], "is not UTF-8 text (byte 0xe9 at offset 3)")):
        code, _, err = _mveb(capsys, "shards", "--src", str(bad_tree), "--out", str(tmp_path / "o.beton"), *extra)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    code, _, err = _mveb(capsys, "shards", "--src", str(bad_tree), "--out", str(tmp_path))
    assert code == 2 and "is a folder" in err
    assert not (tmp_path / "o.beton").exists()


@pytest.mark.parametrize("command, option", [("validate", "--report"), ("validate", "--fix-list"),
                                             ("shards", "--out")])
def test_an_unwritable_output_is_refused_before_the_scan(command: str, option: str, unwritable: Callable[[str], Path],
                                                         bad_tree: Path, calls: Callable[[object, str], list],
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Each once failed only after decoding the whole set (an hour on ImageNet): validate with
    a traceback-free line, shards in /proc with FFCV's writer traceback."""
    import pipeline.validate as validate_module

    scanned = calls(validate_module, "scan")
    monkeypatch.setattr("pipeline.shards.scan", validate_module.scan)
    path = unwritable("out.beton" if command == "shards" else "out.txt")
    code, _, err = _mveb(capsys, command, "--src", str(bad_tree), option, str(path), "--workers", "1")
    assert code == 2, err
    assert err.strip() == f"mveb {command}: error: {option} {path}: " + (
        f"{path.parent} is not a folder" if path.parent.is_file() else
        f"cannot write in {path.parent.parent} (No such file or directory)"), err
    assert scanned == []


@pytest.mark.parametrize("command, option", [("validate", "--report"), ("validate", "--fix-list"),
                                             ("shards", "--out")])
def test_an_output_that_is_a_device_is_refused_and_left_alone(command: str, option: str, bad_tree: Path,
                                                              tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--out /dev/null` once renamed a file onto the device: as root, the machine's /dev/null
    became a 25 MB regular file. A node of the same device under tmp_path stands in for it."""
    device = tmp_path / "null"
    os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    code, _, err = _mveb(capsys, command, "--src", str(bad_tree), option, str(device), "--workers", "1")
    assert code == 2, err
    assert err.strip() == f"mveb {command}: error: {option} {device} is not a regular file (a device, a pipe or " \
                          "a socket); give a file name", err
    assert stat.S_ISCHR(device.lstat().st_mode) and sorted(tmp_path.iterdir()) == [device]


def test_an_output_through_a_symlink_is_written_to_its_target(photo_train: Path, tmp_path: Path) -> None:
    """A shard (and its report) once replaced the symlink with a new file, leaving the target
    it pointed to (on the shared scratch filesystem) stale."""
    target = tmp_path / "scratch" / "train.beton"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "home" / "train.beton"
    link.parent.mkdir()
    link.symlink_to(target)
    build_shard(photo_train, link, max_res=64, workers=1, limit=4, progress=False)
    assert link.is_symlink() and os.readlink(link) == str(target)
    check_beton(target)
    assert json.loads(Path(f"{target}.report.json").read_text())["written"] == 4
    assert sorted(p.name for p in link.parent.iterdir()) == ["train.beton"]


def test_loader_rejects_broken_shards(shard: tuple[Path, dict], tmp_path: Path) -> None:
    good = shard[0].read_bytes()
    cases = {"truncated.beton": good[: len(good) // 2], "header_only.beton": good[:10],
             "not_a_shard.beton": b"PK\x03\x04 a zip file, say" * 100, "empty.beton": b""}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UsageError, match="not a complete FFCV shard|holds no samples"):
            check_data("ffcv", tmp_path / name)
    with pytest.raises(UsageError, match="does not exist"):
        check_data("ffcv", tmp_path / "missing.beton")
    with pytest.raises(UsageError, match="reads an ImageFolder"):
        check_data("torch", shard[0])
    with pytest.raises(UsageError, match="unknown loader backend"):
        build_loader("tensorflow", shard[0], MultiCropRecipe(), 2)
