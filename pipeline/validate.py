"""`mveb validate`: decode every image of an ImageFolder tree, report the ones that fail.

`scan` is the one place that decides which files are usable: the shard writer (FFCV's
writer hangs on a broken JPEG) and the DALI pipeline (it dies on one) train only from
its `good` list.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import Connection
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from mveb.errors import UsageError
from mveb.files import check_writable, shown, write_atomic

from .cache import cache_dir, cache_name
from .images import Sample, decoding_processes, list_image_folder, why_undecodable


@dataclass
class ScanResult:
    root: str
    classes: list[str]
    good: list[Sample] = field(default_factory=list)  # (path, label)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0
    resumed: int = 0  # verdicts kept from a scan of the same files that was cut short

    def report(self) -> dict:
        return {"root": self.root, "classes": self.classes, "files": len(self.good) + len(self.bad),
                "good": len(self.good), "bad": [{"path": p, "reason": r} for p, r in self.bad],
                "seconds": round(self.seconds, 3)}


def scan(src: str | Path, workers: int | None = None, classes: list[str] | None = None,
         progress: bool = True) -> ScanResult:
    """Fully decode every image under `src` in `workers` processes; sort good from bad.

    Verdicts are journaled as they come: a scan killed partway (a preempted job, ImageNet's
    hour of decoding) resumes where it stopped, decoding again only the files not judged yet
    or changed since (size or mtime). A completed scan removes its journal, so each full scan
    decodes everything."""
    start = time.perf_counter()
    class_names, samples = list_image_folder(src, classes)
    workers = decoding_processes(workers)
    journal = ScanJournal(Path(src))
    verdicts = journal.kept([p for p, _ in samples])
    todo = [p for p, _ in samples if p not in verdicts]
    bar = tqdm(total=len(samples), initial=len(verdicts), desc="decode", unit="img", disable=not progress,
               smoothing=0.1)
    with journal:
        judged = zip(todo, map(_verdict, todo)) if workers == 1 or len(todo) < 64 else _judge_in_pool(todo, workers)
        for path, verdict in judged:
            verdicts[path] = verdict[2]
            journal.add(path, verdict)
            bar.update()
    bar.close()
    result = ScanResult(str(src), class_names, resumed=len(samples) - len(todo))
    for path, label in samples:
        reason = verdicts[path]
        if reason is None:
            result.good.append((path, label))
        else:
            result.bad.append((path, reason))
    result.seconds = time.perf_counter() - start
    return result


Verdict = tuple[int, int, str | None]  # (size, mtime_ns, why undecodable or None)


def _judge_in_pool(todo: list[str], workers: int) -> Iterator[tuple[str, Verdict]]:
    """(path, verdict) of every file, in the order judged, decoded by `workers` processes.

    A few chunks per process are queued at a time, so an interrupt leaves the rest of
    ImageNet undecoded. A decoding process that dies (the kernel's OOM killer on a huge
    image, a crash in a decoder) breaks the pool: the files it may have held are then judged
    one process each, so the file that kills its process is found and reported broken, and
    the scan goes on with a new pool."""
    size = max(1, min(64, len(todo) // (workers * 8)))
    chunks = deque(todo[i:i + size] for i in range(0, len(todo), size))
    while chunks:
        suspects: list[str] = []
        pool = ProcessPoolExecutor(workers)
        try:
            running: dict[Future, list[str]] = {}
            while (chunks or running) and not suspects:
                while chunks and len(running) < 2 * workers:
                    chunk = chunks.popleft()
                    running[pool.submit(_verdicts, chunk)] = chunk
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                if any(isinstance(f.exception(), BrokenProcessPool) for f in done):
                    suspects = [p for f, chunk in running.items() if not _judged(f) for p in chunk]
                    done = {f for f in running if _judged(f)}
                for f in done:
                    yield from zip(running.pop(f), f.result())
        finally:
            pool.shutdown(cancel_futures=True)
        if suspects:
            sys.stderr.write(f"warning: a decoding process died; judging the {len(suspects)} file(s) it may "
                             "have held one process each\n")
        for path in suspects:
            yield path, _verdict_alone(path)


def _judged(f: Future) -> bool:
    return f.done() and f.exception() is None


def _verdicts(paths: list[str]) -> list[Verdict]:
    return [_verdict(p) for p in paths]


def _verdict_alone(path: str) -> Verdict:
    """A file judged in a process of its own: one whose decode kills the process is broken."""
    ctx = multiprocessing.get_context()
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_send_verdict, args=(path, send), daemon=True)
    proc.start()
    send.close()
    try:
        verdict = receive.recv()
    except EOFError:  # it died before sending
        verdict = None
    proc.join()
    if verdict is not None:
        return verdict
    code = proc.exitcode or 0
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1, f"decoding it killed the process ({how})"
    return st.st_size, st.st_mtime_ns, f"decoding it killed the process ({how}; out of memory?)"


def _send_verdict(path: str, send: Connection) -> None:
    send.send(_verdict(path))


def _verdict(path: str) -> Verdict:
    try:  # stat before the decode: a file rewritten during it is judged again next time
        st = os.stat(path)
    except OSError:
        return -1, -1, why_undecodable(path)
    return st.st_size, st.st_mtime_ns, why_unlisted(path) or why_undecodable(path)


def why_unlisted(path: str) -> str | None:
    """The fix-list and DALI's file_list are UTF-8 text, one path per line: a name they
    cannot hold is left out like a broken file, so every backend trains on the same files."""
    path = os.path.abspath(path)
    if path.splitlines() != [path]:
        return "its name holds a line break, which no file list can hold; rename it"
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not UTF-8 (file lists are UTF-8 text); rename it"
    return None


class ScanJournal:
    """One JSON line [path, size, mtime_ns, reason] per judged file, in the cache; written
    every few seconds, so a kill loses at most those. An unwritable cache only costs the resume.
    As a context: a block that ends normally (the scan completed) removes the journal; one
    that raises writes what is pending."""

    FLUSH_S = 2.0

    def __init__(self, root: Path) -> None:
        self.path = cache_dir("scans") / f"{cache_name(root.resolve())}.jsonl"
        self.pending: list[str] = []
        self.last_flush = time.monotonic()
        self.writable = True

    def kept(self, paths: list[str]) -> dict[str, str | None]:
        """The verdicts of an interrupted scan that still hold: same path, size and mtime."""
        try:
            lines = self.path.read_text().splitlines()
        except OSError:  # none (the usual case), or unreadable: decode everything
            return {}
        journaled: dict[str, Verdict] = {}
        for line in lines:
            try:
                path, size, mtime, reason = json.loads(line)
            except (ValueError, TypeError):  # the line a kill cut short
                continue
            journaled[path] = (size, mtime, reason)
        kept = {}
        for path in paths:
            if (key := os.path.abspath(path)) in journaled:
                size, mtime, reason = journaled[key]
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                if (st.st_size, st.st_mtime_ns) == (size, mtime):
                    kept[path] = reason
        return kept

    def add(self, path: str, verdict: Verdict) -> None:
        # Absolute: a rerun may spell the same folder otherwise (./train, $PWD/train).
        self.pending.append(json.dumps([os.path.abspath(path), *verdict]) + "\n")
        if time.monotonic() - self.last_flush > self.FLUSH_S:
            self._flush()

    def _flush(self) -> None:
        self.last_flush = time.monotonic()
        lines, self.pending = "".join(self.pending), []
        if not (lines and self.writable):
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:  # one write: whole lines, even beside another scan
                f.write(lines)
        except OSError as e:
            self.writable = False
            sys.stderr.write(f"warning: cannot keep the scan's progress in {self.path} ({e.strerror}); "
                             "a scan killed partway starts over\n")

    def __enter__(self) -> "ScanJournal":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.path.unlink(missing_ok=True)
        else:
            self._flush()


def fix_list_text(result: ScanResult) -> str:
    """DALI `file_list` format: "relative/path label" per line, relative to the scanned root."""
    return "".join(f"{os.path.relpath(p, result.root)} {label}\n" for p, label in result.good)


def read_fix_list(path: str | Path, root: str | Path) -> list[Sample]:
    """The (absolute path, label) samples of a fix-list written by `mveb validate`."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise UsageError(f"cannot read fix-list {path}: {e.strerror}") from None
    samples = []
    for n, line in enumerate(lines, 1):
        rel, _, label = line.rstrip().rpartition(" ")
        if not rel or not label.isdigit():
            raise UsageError(f"{path}:{n} is not 'relative/path label'")
        samples.append((os.path.join(root, rel), int(label)))
    return samples


def kept_report(src: Path) -> Path:
    """Where a folder's scan is kept when it is not beside the folder; the DALI loader looks here."""
    return cache_dir("validate") / f"{cache_name(src.resolve())}.validate.json"


def validate(src: str | Path, report: str | Path | None = None, fix_list: str | Path | None = None,
             workers: int | None = None) -> ScanResult:
    """Scan `src`, write the JSON report (and the fix-list), print a one-line summary."""
    check_writable(report, "--report")  # now, not after a scan that takes an hour on ImageNet
    check_writable(fix_list, "--fix-list")
    result = scan(src, workers)
    src_path = Path(src).resolve()
    text = json.dumps(result.report(), indent=1) + "\n"
    if report:
        report = Path(report)
        write_atomic(report, text)
    else:
        report = src_path.parent / f"{src_path.name}.validate.json"
        try:
            write_atomic(report, text)
        except UsageError as e:  # a read-only dataset mount
            report = kept_report(src_path)
            write_atomic(report, text)
            print(f"note: {e}; the report is kept in the cache instead, where the DALI loader reads it")
    if fix_list:
        write_atomic(fix_list, fix_list_text(result))
    print(f"{len(result.good)} decodable, {len(result.bad)} broken of {len(result.good) + len(result.bad)} files "
          f"in {result.seconds:.1f} s" + (f" ({result.resumed} judged by the scan cut short before)" if result.resumed
                                            else "") + f"; report: {report}" + (f"; fix-list: {fix_list}" if fix_list else ""))
    for path, reason in result.bad[:10]:
        print(f"  broken: {shown(path)}: {reason}")
    if len(result.bad) > 10:
        print(f"  ... and {len(result.bad) - 10} more in the report")
    return result
