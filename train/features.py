"""Backbones to evaluate and their frozen features: what kNN, linear evaluation and the demo share.

A backbone comes from a run folder (its newest checkpoint), a training checkpoint, an
exported torchvision state_dict, or nowhere (seeded random init, the baseline). Images come
from an ImageFolder (PIL) or a labelled .beton (FFCV) as uint8 batches and are normalized on
the device: a uint8 batch is a quarter of the bytes to move.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision import transforms as T
from tqdm import tqdm

from mveb.errors import UsageError
from pipeline.images import list_image_folder, open_rgb, usable_cpus
from pipeline.recipe import IMAGENET_MEAN, IMAGENET_STD
from pipeline.shards import check_beton
from train.checkpoint import load_checkpoint, load_latest
from train.model import build_backbone

DEFAULT_ARCH = "resnet50"
# The standard evaluation crop: resize the shorter side to size / 0.875, take the centre square.
CENTER_CROP_RATIO = 224 / 256


def check_eval_options(image_size: int, batch_size: int, workers: int | None) -> None:
    if image_size < 16:
        raise UsageError(f"--image-size must be at least 16 (a ResNet downsamples 32x), got {image_size}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise UsageError(f"--workers must be 0 (decode in this process) or more, got {workers}")


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; fp32 on CPU, where bf16 convolutions are slower, not faster."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------- backbones

def feature_width(backbone: nn.Module) -> int:
    """Channels of the pooled feature (2048 for resnet50, 512 for resnet18)."""
    last = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)][-1]
    return last.num_features


def read_checkpoint(source: str | Path) -> tuple[Path, object]:
    """A checkpoint file's contents, or a run folder's newest readable checkpoint."""
    path = Path(source)
    if not path.exists():
        raise UsageError(f"{source} does not exist (pass a run folder, a checkpoint or an exported backbone)")
    if path.is_file():
        if path.stat().st_size == 0:
            raise UsageError(f"{source} is empty (0 bytes): not a checkpoint")
        return path, load_checkpoint(path)
    found = load_latest(path)
    if found is None:
        raise UsageError(f"run folder {source} holds no readable checkpoint (train first, or pass a checkpoint file)")
    return found


def backbone_state(source: str | Path) -> tuple[dict[str, Tensor], str | None]:
    """Backbone weights under torchvision names, and the arch the checkpoint's config names.

    A training checkpoint holds {"model": {"backbone.<name>": ...}, "config": {"model": {"arch": ...}}};
    an exported backbone (or any torchvision ResNet state_dict) is the names themselves, and
    its classifier, if any, is dropped so that supervised torchvision weights work as a baseline.
    """
    path, blob = read_checkpoint(source)
    if not isinstance(blob, dict):
        raise UsageError(f"{path} is not a checkpoint (it holds a {type(blob).__name__}, not a dict)")
    if isinstance(blob.get("model"), dict):
        prefix = "backbone."
        state = {k[len(prefix):]: v for k, v in blob["model"].items() if k.startswith(prefix)}
        if not state:
            raise UsageError(f"{path} has a model but no backbone.* weights (is it an MVEB checkpoint?)")
        model_config = (blob.get("config") or {}).get("model") or {}
        return state, model_config.get("arch")
    state = {k: v for k, v in blob.items() if isinstance(v, Tensor) and not k.startswith("fc.")}
    if not state:
        raise UsageError(f"{path} is neither an MVEB checkpoint nor a backbone state_dict")
    return state, None


def load_backbone(source: str | Path | None, arch: str | None = None, seed: int = 0) -> nn.Module:
    """The backbone to evaluate, in eval mode on the CPU; None gives a seeded random init.

    `arch` None means the checkpoint's own (resnet50 for an exported backbone or random init);
    an explicit arch that differs from the checkpoint's is a usage error, not a silent reload.
    """
    if source is None:
        arch = arch or DEFAULT_ARCH
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _named(build_backbone(arch)[0], arch).eval()
    state, saved_arch = backbone_state(source)
    if arch and saved_arch and arch != saved_arch:
        raise UsageError(f"--arch {arch} does not match {source}, which holds a {saved_arch} (drop --arch)")
    arch = arch or saved_arch or DEFAULT_ARCH
    model = _named(build_backbone(arch)[0], arch)
    hint = "pass the --arch it was trained with" if saved_arch is None else "the checkpoint's config is wrong"
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise UsageError(f"{source} does not hold {arch} weights (tensor shapes differ); {hint}") from e
    if missing or unexpected:
        example = (list(missing) + list(unexpected))[0]
        raise UsageError(f"{source} does not hold {arch} weights ({len(missing)} missing, {len(unexpected)} "
                         f"unexpected keys, e.g. {example}); {hint}")
    return model.eval()


def _named(model: nn.Module, arch: str) -> nn.Module:
    model.arch_name = arch  # for reports: a state_dict does not say which ResNet it is
    return model


# ---------------------------------------------------------------- images

@dataclass
class LabelledImages:
    """uint8 batches [B, 3, S, S] with int64 labels [B], from an ImageFolder or a labelled .beton."""

    path: Path
    batches: object  # re-iterable: (images, labels), or for folders (images, labels, index, ok)
    num_images: int
    num_classes: int
    classes: list[str] | None  # folder class names; a .beton stores only numbers
    samples: list[tuple[str, int]] | None = None
    label_first: bool = False  # a .beton whose label field precedes its image field
    skipped: list[str] = field(default_factory=list)  # files that could not be decoded

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in self.batches:
            if self.samples is None:
                x, y = batch[::-1] if self.label_first else batch
                yield x, y.long().reshape(-1)
                continue
            images, labels, index, ok = batch
            self.skipped += [self.samples[i][0] for i in index[~ok].tolist()]
            if ok.any():
                yield images[ok], labels[ok]


class _Folder(torch.utils.data.Dataset):
    """ImageFolder samples opened as every backend opens them; an undecodable file is flagged, not a crash."""

    def __init__(self, samples: list[tuple[str, int]], transform: T.Compose, side: int) -> None:
        self.samples, self.transform, self.side = samples, transform, side

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int, bool]:
        path, label = self.samples[i]
        try:
            return self.transform(open_rgb(path)), label, i, True
        except (OSError, ValueError, SyntaxError, EOFError, MemoryError, Image.DecompressionBombError):
            return torch.zeros(3, self.side, self.side, dtype=torch.uint8), label, i, False


def image_transform(size: int, augment: bool) -> T.Compose:
    """Centre crop for features; RandomResizedCrop + flip (the standard linear-eval recipe) to train a head."""
    if augment:
        head = [T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC), T.RandomHorizontalFlip()]
    else:
        head = [T.Resize(round(size / CENTER_CROP_RATIO), interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(size)]
    return T.Compose(head + [T.PILToTensor()])


def default_workers() -> int:
    return min(8, usable_cpus())


def open_images(source: str | Path, image_size: int, batch_size: int, augment: bool = False,
                workers: int | None = None, seed: int = 0) -> LabelledImages:
    """Batches of a labelled set, in file order unless `augment` (then shuffled, seeded)."""
    path = Path(source)
    workers = default_workers() if workers is None else workers
    if not path.exists():
        raise UsageError(f"{source} does not exist (pass a labelled ImageFolder or .beton)")
    if path.is_file():
        if path.suffix != ".beton":
            raise UsageError(f"{source} is a file but not a .beton shard (pass an ImageFolder or a .beton)")
        return _cached_beton(path, image_size, batch_size, augment, workers, seed)
    classes, samples = list_image_folder(path)
    dataset = _Folder(samples, image_transform(image_size, augment), image_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=augment, num_workers=workers,
        generator=torch.Generator().manual_seed(seed), pin_memory=torch.cuda.is_available())
    return LabelledImages(path, loader, len(samples), len(classes), classes, samples=samples)


def _open_beton(path: Path, image_size: int, batch_size: int, augment: bool, workers: int,
                seed: int) -> LabelledImages:
    from pipeline.ffcv_loader import ffcv_threads  # also patches FFCV's reader (pipeline.ffcv_fix)
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.reader import Reader
    from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage

    check_beton(path)
    reader = Reader(str(path))
    kinds = {name: type(handler) for name, handler in reader.handlers.items()}
    images = [n for n, k in kinds.items() if k is RGBImageField]
    labels = [n for n, k in kinds.items() if k is IntField]
    if not images or not labels:
        raise UsageError(f"{path} needs an image field and an integer label field; it has {sorted(kinds)}")
    image_name, label_name = images[0], labels[0]
    all_labels = reader.metadata[f"f{reader.field_names.index(label_name)}"]
    if augment:
        image_ops = [RandomResizedCropRGBImageDecoder((image_size, image_size)), RandomHorizontalFlip()]
    else:
        image_ops = [CenterCropRGBImageDecoder((image_size, image_size), ratio=CENTER_CROP_RATIO)]
    pipelines: dict[str, list | None] = {name: None for name in reader.field_names}
    pipelines[image_name] = image_ops + [ToTensor(), ToTorchImage()]
    pipelines[label_name] = [IntDecoder(), ToTensor(), Squeeze(1)]
    loader = Loader(str(path), batch_size=batch_size, num_workers=ffcv_threads(max(1, workers)),
                    order=OrderOption.RANDOM if augment else OrderOption.SEQUENTIAL, seed=seed,
                    pipelines=pipelines, drop_last=False)
    label_first = reader.field_names.index(label_name) < reader.field_names.index(image_name)
    return LabelledImages(path, loader, int(reader.num_samples), int(all_labels.max()) + 1, None,
                          label_first=label_first)


# A .beton loader is kept for the life of the process and reused (each pass is a new epoch):
# compiling one costs 10-30 s, which a periodic kNN monitor would pay every time, and a
# collected loader runs numba finalizers that trip over the overloads the next loader
# shares ("Exception ignored ... KeyError" on stderr).
_BETON_CACHE: dict[tuple, LabelledImages] = {}


def _cached_beton(path: Path, image_size: int, batch_size: int, augment: bool, workers: int,
                  seed: int) -> LabelledImages:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, image_size, batch_size, augment, workers, seed)
    if key not in _BETON_CACHE:
        _BETON_CACHE[key] = _open_beton(path, image_size, batch_size, augment, workers, seed)
    return _BETON_CACHE[key]


# ---------------------------------------------------------------- features

def to_model_input(images: Tensor, device: torch.device) -> Tensor:
    """uint8 [B, 3, H, W] -> ImageNet-normalized float, channels_last, on `device`."""
    x = images.to(device, non_blocking=True).to(memory_format=torch.channels_last).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def prepare(backbone: nn.Module, device: torch.device) -> nn.Module:
    return backbone.eval().to(device, memory_format=torch.channels_last)


@torch.no_grad()
def embed(backbone: nn.Module, images: Tensor, device: torch.device) -> Tensor:
    """Pooled fp32 backbone features [B, width] of a uint8 batch (backbone already prepared)."""
    with autocast(device):
        return backbone(to_model_input(images, device)).float()


@dataclass
class Features:
    feats: Tensor  # [N, width] fp32 on the CPU, L2-normalized unless asked otherwise
    labels: Tensor  # [N] int64
    num_classes: int
    classes: list[str] | None
    skipped: list[str]


def extract_features(backbone: nn.Module, source: str | Path, image_size: int, batch_size: int,
                     device: torch.device, normalize: bool = True, workers: int | None = None,
                     progress: bool = True) -> Features:
    """Centre-crop features of every image of a labelled set, in file order, with a progress bar
    unless `progress` is off (the trainer's run.progress=false, for SLURM logs).

    The backbone runs in eval mode and is handed back in the mode it came in, so the trainer's
    periodic kNN monitor can pass its live online backbone.
    """
    images = open_images(source, image_size, batch_size, workers=workers)
    if images.num_images == 0:
        raise UsageError(f"{source} holds no images")
    was_training = backbone.training
    backbone = prepare(backbone, device)
    feats, labels = [], []
    try:
        with tqdm(total=images.num_images, desc=f"features {images.path.name}", unit="img", leave=False,
                  disable=not progress) as bar:
            for x, y in images:
                f = embed(backbone, x, device)
                feats.append((F.normalize(f, dim=1) if normalize else f).cpu())
                labels.append(y)
                bar.update(len(y))
    finally:
        backbone.train(was_training)
    if not feats:
        raise UsageError(f"no image of {source} could be decoded (run mveb validate on it)")
    return Features(torch.cat(feats), torch.cat(labels), images.num_classes, images.classes, images.skipped)


def check_same_classes(train_classes: list[str] | None, train_num_classes: int, val: Features,
                       train_path: str, val_path: str) -> None:
    """Validation labels must mean what training labels mean: same class folders, no unseen label."""
    if train_classes is not None and val.classes is not None and train_classes != val.classes:
        raise UsageError(f"{train_path} and {val_path} have different class folders; they must match")
    if int(val.labels.max()) >= train_num_classes:
        raise UsageError(f"{val_path} has labels up to {int(val.labels.max())} but {train_path} only "
                         f"{train_num_classes} classes")
