"""`mveb validate`: decode every image of an ImageFolder tree, report the ones that fail.

`scan` is the one place that decides which files are usable: the shard writer (FFCV's
writer hangs on a broken JPEG) and the DALI pipeline (it dies on one) train only from
its `good` list.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from mveb.errors import UsageError
from mveb.files import check_writable, write_atomic

from .cache import cache_dir, cache_name
from .images import Sample, decoding_processes, list_image_folder, why_undecodable


@dataclass
class ScanResult:
    root: str
    classes: list[str]
    good: list[Sample] = field(default_factory=list)  # (path, label)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0

    def report(self) -> dict:
        return {"root": self.root, "classes": self.classes, "files": len(self.good) + len(self.bad),
                "good": len(self.good), "bad": [{"path": p, "reason": r} for p, r in self.bad],
                "seconds": round(self.seconds, 3)}


def scan(src: str | Path, workers: int | None = None, classes: list[str] | None = None,
         progress: bool = True) -> ScanResult:
    """Fully decode every image under `src` in `workers` processes; sort good from bad."""
    start = time.perf_counter()
    class_names, samples = list_image_folder(src, classes)
    workers = decoding_processes(workers)
    paths = [p for p, _ in samples]
    bar = tqdm(total=len(paths), desc="decode", unit="img", disable=not progress, smoothing=0.1)
    if workers == 1 or len(paths) < 64:
        reasons = []
        for p in paths:
            reasons.append(why_undecodable(p))
            bar.update()
    else:
        with ProcessPoolExecutor(workers) as pool:
            reasons = []
            for r in pool.map(why_undecodable, paths, chunksize=max(1, min(64, len(paths) // (workers * 8)))):
                reasons.append(r)
                bar.update()
    bar.close()
    result = ScanResult(str(src), class_names)
    for (path, label), reason in zip(samples, reasons):
        if reason is None:
            result.good.append((path, label))
        else:
            result.bad.append((path, reason))
    result.seconds = time.perf_counter() - start
    return result


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
          f"in {result.seconds:.1f} s; report: {report}" + (f"; fix-list: {fix_list}" if fix_list else ""))
    for path, reason in result.bad[:10]:
        print(f"  broken: {path}: {reason}")
    if len(result.bad) > 10:
        print(f"  ... and {len(result.bad) - 10} more in the report")
    return result
