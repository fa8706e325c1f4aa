"""Finding and opening the images of an ImageFolder tree, the same way for every tool.

Every backend must see the same pixels for the same file, so opening (EXIF rotation,
mode conversion to 8-bit RGB) lives here once: the validator, the shard writer and the
reference loader all call `open_rgb`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps

from mveb.errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

# PIL refuses images over ~179 Mpx as decompression bombs. A training set is the user's own
# data, and a 200 Mpx panorama is a real (if silly) photo, so only refuse what cannot fit
# in memory comfortably (1 Gpx is 3 GB of RGB).
Image.MAX_IMAGE_PIXELS = 1 << 30

Sample = tuple[str, int]  # (path, label)

# PIL opens a file by its content, whatever it is named, so a GIF or a Targa saved as .jpg
# decodes here, and DALI's decoder would stop the run on it. These formats are the ones DALI
# was measured to decode like PIL; one verdict keeps every backend on the same files.
DALI_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "PPM", "TIFF", "JPEG2000")


def usable_cpus() -> int:
    """CPUs this process may run on: under SLURM (or taskset) that is the allocation, not the node."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decoding_processes(workers: int | None) -> int:
    """--workers of the CPU-only commands (validate, shards): unset means one per usable CPU."""
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be at least 1 (unset: one per CPU), got {workers}")
    return workers or usable_cpus()


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def find_classes(root: str | Path, classes: list[str] | None = None) -> list[str]:
    """Class folder names of an ImageFolder root, sorted (or as given), with clear errors."""
    if not str(root):  # Path("") is ".": an unset "$DATA" would scan the working folder
        raise UsageError("the data path is empty; pass an ImageFolder root (one subfolder per class)")
    root = Path(root)
    if not root.exists():
        raise UsageError(f"{root} does not exist; pass an ImageFolder root (one subfolder per class)")
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder; pass an ImageFolder root (one subfolder per class)")
    try:
        found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise UsageError(f"cannot read {root} ({e.strerror})") from None
    if classes is None:
        if not found:
            loose = any(is_image_name(e.name) for e in os.scandir(root) if e.is_file())
            hint = " (it holds images directly: move them into one subfolder per class)" if loose else ""
            raise UsageError(f"{root} has no class subfolders{hint}; expected ROOT/<class>/<image>")
        return found
    missing = [c for c in classes if c not in found]
    if missing:
        raise UsageError(f"class folders listed but not found under {root}: {', '.join(missing[:5])}")
    return list(classes)


def check_same_class_folders(train: tuple[str, str | Path], val: tuple[str, str | Path]) -> None:
    """(option, path) of a labelled pair: where both are ImageFolders, the class folders the
    loaders will read (hidden ones left out) must match, found before any image is decoded."""
    if not (train[1] and val[1] and Path(train[1]).is_dir() and Path(val[1]).is_dir()):
        return  # a .beton carries its own labels: compared once read
    try:
        a, b = find_classes(train[1]), find_classes(val[1])
    except OSError as e:
        raise UsageError(f"{train[0]} and {val[0]} cannot be read: {e}") from None
    if a != b:
        raise UsageError(f"{train[0]} and {val[0]} have different class folders ({len(a)} and {len(b)}); "
                         "the labels must mean the same")


def list_image_folder(root: str | Path, classes: list[str] | None = None) -> tuple[list[str], list[Sample]]:
    """(classes, [(path, label), ...]) of an ImageFolder tree, files sorted within each class.

    Raises UsageError for a missing path, a file, a folder without class subfolders, or a
    tree with no image files at all.
    """
    classes = find_classes(root, classes)
    root = Path(root)
    samples: list[Sample] = []
    for label, cls, dirpath, filenames in _class_walk(root, classes):
        samples += [(os.path.join(dirpath, f), label) for f in sorted(filenames) if is_image_name(f)]
    if not samples:
        check_image_folder(root)
    return classes, samples


def check_image_folder(root: str | Path) -> None:
    """Cheap up-front check (stops at the first image): raises UsageError like list_image_folder."""
    classes = find_classes(root)
    for _, _, _, filenames in _class_walk(Path(root), classes):
        if any(is_image_name(f) for f in filenames):
            return
    raise UsageError(f"{root} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)}, any case)")


def _class_walk(root: Path, classes: list[str]) -> Iterator[tuple[int, str, str, list[str]]]:
    """(label, class, folder, file names) of every folder under each class, sorted.

    Links to folders are followed (class folders linked from other storage are common), but
    each real folder is read once, and a link back into the tree (`ln -s .. up`: a loop that
    never ends, or another class's images under this label) is skipped with one warning. An
    unreadable folder is an error: its images would silently be missing from training."""
    root_real = os.path.realpath(root)
    class_reals = {cls: os.path.realpath(root / cls) for cls in classes}
    seen = set(class_reals.values())
    skipped = 0

    def unreadable(e: OSError) -> None:
        raise UsageError(f"cannot read {e.filename} ({e.strerror}); its images would be left out")

    for label, cls in enumerate(classes):
        own = class_reals[cls]
        for dirpath, dirnames, filenames in os.walk(root / cls, onerror=unreadable, followlinks=True):
            keep = []
            for d in sorted(dirnames):
                real = os.path.realpath(os.path.join(dirpath, d))
                elsewhere_in_tree = _within(real, root_real) and not _within(real, own)
                if real in seen or elsewhere_in_tree or _within(own, real):
                    skipped += 1
                    continue
                seen.add(real)
                keep.append(d)
            dirnames[:] = keep
            yield label, cls, dirpath, filenames
    if skipped:
        sys.stderr.write(f"warning: {root}: skipped {skipped} folder link(s) to a folder already read "
                         "(a loop, or another class's folder)\n")


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def read_class_file(path: str | Path) -> list[str]:
    """One class folder name per line (blank lines and # comments ignored)."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()  # -sig: Notepad's byte-order mark
    except OSError as e:
        raise UsageError(f"cannot read class list {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"class list {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    names = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not names:
        raise UsageError(f"class list {path} is empty")
    if len(set(names)) != len(names):
        raise UsageError(f"class list {path} names a class twice")
    return names


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB; 16/32-bit integer greyscale is scaled, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I"):
        # "I;16*" and "I" (PIL's 16-bit PNG greyscale) span 0..65535; clipping would saturate.
        a = np.asarray(img).astype(np.uint32)
        a8 = ((a * 255 + 32767) // 65535).clip(0, 255).astype(np.uint8) if a.max(initial=0) > 255 else a.astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float32)
        scale = 255.0 if a.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray((a * scale).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def open_rgb(path: str | Path) -> Image.Image:
    """Fully decode one file as an upright 8-bit RGB image; raises on anything undecodable."""
    with Image.open(path) as img:
        # exif_transpose returns a detached copy, so the result outlives the open file.
        return to_rgb8(ImageOps.exif_transpose(img))


def why_undecodable(path: str | Path) -> str | None:
    """None when `open_rgb` succeeds, else one line saying why it fails."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as header:
            fmt, mode = header.format, header.mode
        if fmt not in DALI_FORMATS:
            return f"a {fmt} image (DALI cannot decode {fmt}); convert it to JPEG or PNG"
        if fmt == "TIFF" and mode == "1":
            return "a 1-bit TIFF image (DALI cannot decode it); convert it to JPEG or PNG"
        img = open_rgb(path)
        if img.width < 1 or img.height < 1:
            return "image has no pixels"
    except Image.UnidentifiedImageError:
        return "not an image (unrecognised format)"
    except Image.DecompressionBombError as e:
        return f"too large: {e}"
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        msg = str(e) or type(e).__name__
        return f"undecodable: {msg}"
    except MemoryError:
        return "too large to decode in memory"
    return None
