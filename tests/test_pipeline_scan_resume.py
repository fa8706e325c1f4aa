"""A scan killed partway (a preempted `mveb validate`, shard build or DALI loader start)
resumes from its journal: only files not judged yet, or changed since, are decoded again."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import pipeline.validate as validate_module
from pipeline.validate import ScanJournal, scan


def _complete_lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def test_a_scan_killed_partway_resumes_where_it_stopped(photo_train: Path, tmp_path: Path,
                                                        calls: Callable[[object, str], list]) -> None:
    root = tmp_path / "train"
    shutil.copytree(photo_train, root)
    # A real process, really killed; only slowed down, so that the kill lands mid-scan.
    code = ("import time, pipeline.validate as v\n"
            "v.ScanJournal.FLUSH_S = 0\n"
            "decode = v.why_undecodable\n"
            "v.why_undecodable = lambda p: time.sleep(0.03) or decode(p)\n"
            f"v.scan({str(root)!r}, workers=1, progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    journal = ScanJournal(root).path
    deadline = time.monotonic() + 120
    while _complete_lines(journal) < 60 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    judged = _complete_lines(journal)
    assert 60 <= judged < 288, judged
    with open(journal, "a") as f:
        f.write('["' + str(root))  # a line the kill cut short
    first = sorted(root.rglob("*.jpg"))[0]
    assert str(first) in journal.read_text()  # judged decodable before the kill; now broken
    first.write_bytes(b"not a jpeg any more")

    decoded = calls(validate_module, "why_undecodable")
    # The same folder spelled otherwise (once a rerun with $PWD/train after ./train decoded all).
    (tmp_path / "x").mkdir()
    result = scan(tmp_path / "x" / ".." / "train", workers=1, progress=False)
    assert result.resumed == judged - 1
    assert len(decoded) == 288 - judged + 1 and str(first) in map(os.path.abspath, decoded)
    assert [os.path.abspath(p) for p, _ in result.bad] == [str(first)]
    assert len(result.good) == 287 and not journal.exists()  # completed: the next scan decodes all

    decoded.clear()
    assert scan(root, workers=1, progress=False).resumed == 0 and len(decoded) == 288


def test_an_unwritable_cache_costs_the_resume_not_the_scan(photo_train: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MVEB_CACHE_DIR", "/proc/mveb-test")
    monkeypatch.setattr(ScanJournal, "FLUSH_S", 0)
    result = scan(photo_train, workers=1, progress=False)
    assert len(result.good) == 288 and not result.bad
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "a scan killed partway starts over" in warnings[0], warnings


def test_an_interrupted_parallel_scan_stops_without_decoding_the_rest(photo_train: Path, tmp_path: Path) -> None:
    """The pool's path: the chunks queued but not started are dropped (an interrupted scan must
    not decode the rest of ImageNet before it exits), and what was judged is kept."""
    import signal

    decoded = tmp_path / "decoded.txt"
    code = ("import time, pipeline.validate as v\n"
            "v.ScanJournal.FLUSH_S = 0\n"
            "decode = v.why_undecodable\n"
            f"def slow(p):\n    time.sleep(0.05)\n    open({str(decoded)!r}, 'a').write(p + '\\n')\n"
            "    return decode(p)\n"
            "v.why_undecodable = slow\n"
            f"v.scan({str(photo_train)!r}, workers=2, progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    journal = ScanJournal(photo_train).path
    deadline = time.monotonic() + 120
    while _complete_lines(journal) < 20 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # the main process only, as a handler's exit would leave it
    _, err = proc.communicate(timeout=120)
    assert "KeyboardInterrupt" in err
    assert _complete_lines(decoded) < 200, "the queued chunks were decoded after the interrupt"
    judged = _complete_lines(journal)
    assert 20 <= judged < 288
    assert scan(photo_train, workers=1, progress=False).resumed == judged
