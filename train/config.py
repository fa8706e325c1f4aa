"""Run configuration: one dataclass per concern, two presets, `key=value` overrides.

`get_config("imagenet_rn50", ["optim.base_lr=0.5"])` returns a Config; the whole thing
round-trips through JSON (Config.to_dict / from_dict) and is saved in the run folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mveb.errors import UsageError
from mveb.files import check_writable
from pipeline.images import check_same_class_folders
from pipeline.recipe import DEFAULT_RECIPE, MultiCropRecipe


@dataclass
class DataConfig:
    path: str = ""
    loader: str = "ffcv"  # ffcv | dali | torch
    batch_size: int = 128  # per process (per GPU)
    global_batch_size: int | None = None  # when set, split evenly over the processes (overrides batch_size)
    workers: int = 8
    # How the dali loader runs, as "key=value,..." over pipeline.dali_graph.DALITuning (its
    # defaults were tuned on an H200), e.g. "hw_decoder_load=0.95,prefetch=2"; "" = defaults.
    dali_tuning: str = ""
    seed: int = 0  # augmentation and order; each rank adds its rank
    # View counts and sizes; None keeps pipeline.recipe's default (2 x 224 + 6 x 96).
    n_global: int | None = None
    global_size: int | None = None
    n_local: int | None = None
    local_size: int | None = None
    # Any other recipe field, as "key=value,..." over pipeline.recipe.MultiCropRecipe, ranges
    # and per-view values joined by ':', e.g. "global_scale=0.14:1,local_blur_p=0.3"; "" = the paper's.
    augment: str = ""

    def recipe(self) -> MultiCropRecipe:
        d = DEFAULT_RECIPE
        views = (self.n_global, self.global_size, self.n_local, self.local_size)
        if any(v is not None for v in views):
            ng, gs, nl, ls = (v if v is not None else dv for v, dv in
                              zip(views, (d.n_global, d.global_size, d.n_local, d.local_size)))
            try:
                d = d.with_views(ng, gs, nl, ls)
            except ValueError as e:
                raise UsageError(f"data.n_global/global_size/n_local/local_size: {e}") from None
        return d.with_overrides(self.augment)


@dataclass
class ModelConfig:
    arch: str = "resnet50"  # any torchvision ResNet
    proj_hidden: int = 2048
    proj_dim: int = 2048
    per_view_forward: bool = False  # True: one backbone pass per view, like the official code
    sync_bn: bool = True  # under DDP
    # Which GPUs share BatchNorm statistics under sync_bn: world (all of them, the official
    # recipe) or node (those of one host: no inter-node latency in the BN layers' critical path,
    # statistics over gpus_per_node x batch_size samples; see the README's scaling model).
    sync_bn_group: str = "world"


@dataclass
class OptimConfig:
    base_lr: float = 0.3  # per 256 samples of global batch
    weight_decay: float = 1e-6
    momentum: float = 0.9
    trust_coefficient: float = 0.001
    min_lr_ratio: float = 1e-3


@dataclass
class ScheduleConfig:
    epochs: int = 800
    warmup_epochs: int = 10
    steps: int | None = None  # stop after this many steps in total (the schedule still spans `epochs`)
    ema_momentum: float = 0.996  # EMA momentum at step 0, raised to 1 by a cosine


@dataclass
class LossConfig:
    lam: float = 0.01
    eta: float = 0.01
    min_tau: float = 0.1
    impl: str = "auto"  # auto | triton | torch | reference
    # local: the entropy of each GPU's own batch, as the official code; global: of every GPU's
    # rows (the views' solves shared out over the GPUs, two all_to_alls; see kernels.mveb_loss).
    entropy_batch: str = "local"


@dataclass
class PrecisionConfig:
    amp: str = "bf16"  # bf16 | fp16 (with GradScaler) | fp32, on CUDA; a CPU run is fp32 (train/step.py amp_dtype)
    compile: bool = False
    # Run the step on a high-priority CUDA stream, ahead of a GPU loader's kernels (mveb.devices.step_stream).
    priority_stream: bool = False


@dataclass
class RunConfig:
    out: str = "runs/pretrain"
    resume: str = "auto"  # auto (newest checkpoint in out) | a checkpoint path | none
    checkpoint_every_steps: int = 1000
    checkpoint_every_minutes: float = 30.0
    log_every_steps: int = 10
    tensorboard: bool = True
    progress: bool = True


@dataclass
class MonitorConfig:
    # kNN top-1/top-5 (k=200, T=0.1, centre crops at the global view size) of the online
    # backbone every this many epochs and at the end, into metrics.jsonl; 0 = off. Rank 0
    # computes it while the others wait, under the process group timeout: keep the two sets
    # small (tens of images per class), not all of ImageNet.
    knn_every_epochs: int = 0
    knn_train: str = ""  # labelled ImageFolder or .beton: the memory bank
    knn_val: str = ""  # labelled ImageFolder or .beton: scored against it


@dataclass
class DistConfig:
    backend: str = "auto"  # auto (nccl on GPUs, gloo on CPU) | nccl | gloo
    timeout_minutes: float = 30.0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    run: RunConfig = field(default_factory=RunConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, dict[str, Any]]) -> "Config":
        cfg = cls()
        for group, values in d.items():
            for key, value in values.items():
                _set(cfg, f"{group}.{key}", value)
        return cfg


def imagenet_rn50() -> Config:
    """The official recipe: ResNet-50, 128 per GPU (4096 on 32 GPUs), LR 0.3 x global/256, 800 epochs."""
    return Config()


def demo() -> Config:
    """Runs on 2 CPU cores in a few minutes: ResNet-18, 2 x 64 px + 2 x 32 px views, 512-d
    projector, batch 32, base LR 16 (peak 2.0: LARS moves each weight by about lr x 0.001 of
    its norm per step, so the official peak of 4.8 is the right scale, not 0.3 x 32 / 256),
    25 epochs with 2 warmup, torch loader with 2 workers, a checkpoint every 25 steps."""
    return Config(
        data=DataConfig(loader="torch", batch_size=32, workers=2, n_global=2, global_size=64, n_local=2, local_size=32),
        model=ModelConfig(arch="resnet18", proj_hidden=512, proj_dim=512),
        optim=OptimConfig(base_lr=16.0),
        schedule=ScheduleConfig(epochs=25, warmup_epochs=2),
        run=RunConfig(out="runs/demo", checkpoint_every_steps=25, checkpoint_every_minutes=2.0, log_every_steps=1),
    )


PRESETS = {"imagenet_rn50": imagenet_rn50, "demo": demo}


def check_config(cfg: Config, world_size: int) -> None:
    """Every user mistake the config can hold, as one UsageError, before any rendezvous."""
    d, s = cfg.data, cfg.schedule
    if not d.path:
        raise UsageError("no training data given; pass --data PATH (an ImageFolder root or a .beton shard)")
    if not Path(d.path).exists():
        raise UsageError(f"training data {d.path} does not exist; pass an ImageFolder root or a .beton shard")
    if d.recipe().n_global < 2:
        raise UsageError("MVEB needs at least 2 global views (the momentum targets); set data.n_global=2")
    from pipeline.loaders import BACKENDS, dali_tuning_for  # imports torch: only when a run is about to start

    if d.loader not in BACKENDS:
        raise UsageError(f"data.loader={d.loader!r}; use one of {', '.join(BACKENDS)}")
    if d.dali_tuning:
        dali_tuning_for(d.loader, d.dali_tuning)
    if d.global_batch_size is not None:
        if d.global_batch_size % world_size:
            raise UsageError(f"global batch {d.global_batch_size} is not divisible by the world size {world_size}; "
                             f"use a multiple of {world_size}")
        d.batch_size = d.global_batch_size // world_size
    if d.batch_size < 2:
        raise UsageError(f"batch size per process is {d.batch_size}; MVEB's entropy needs at least 2 samples")
    if s.epochs < 1:
        raise UsageError(f"schedule.epochs={s.epochs}; it must be at least 1")
    if not 0 <= s.warmup_epochs <= s.epochs:
        raise UsageError(f"schedule.warmup_epochs={s.warmup_epochs} with {s.epochs} epochs; it must be 0 to "
                         f"{s.epochs} (set schedule.warmup_epochs=N with --epochs)")
    if s.steps is not None and s.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {s.steps}")
    _check_ranges(cfg)
    from kernels import IMPLS

    for key, value, allowed in (("loss.impl", cfg.loss.impl, IMPLS), ("dist.backend", cfg.dist.backend,
                                                                        ("auto", "nccl", "gloo"))):
        if value not in allowed:
            raise UsageError(f"{key}={value!r}; use one of {', '.join(allowed)}")
    if cfg.model.sync_bn_group not in ("world", "node"):
        raise UsageError(f"model.sync_bn_group={cfg.model.sync_bn_group!r}; use world (all GPUs) or node (one host's)")
    if cfg.loss.entropy_batch not in ("local", "global"):
        raise UsageError(f"loss.entropy_batch={cfg.loss.entropy_batch!r}; use local (per GPU) or global (all GPUs)")
    if cfg.loss.entropy_batch == "global" and cfg.loss.impl.startswith("reference"):
        raise UsageError(f"loss.entropy_batch=global needs loss.impl auto, torch or triton, not {cfg.loss.impl}")
    m = cfg.monitor
    if m.knn_every_epochs < 0:
        raise UsageError(f"monitor.knn_every_epochs must be 0 (off) or more, got {m.knn_every_epochs}")
    if m.knn_every_epochs:
        for key, path in (("monitor.knn_train", m.knn_train), ("monitor.knn_val", m.knn_val)):
            if not path or not Path(path).exists():
                raise UsageError(f"{key}={path!r}: the kNN monitor needs a labelled ImageFolder or .beton there")
        # Found now, not at the first monitor hours in.
        check_same_class_folders(("monitor.knn_train", m.knn_train), ("monitor.knn_val", m.knn_val))
    out = Path(cfg.run.out).resolve()
    if not cfg.run.out.strip():
        raise UsageError("no run folder given; pass --out DIR")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {cfg.run.out} is a file; the run folder must be a folder (new or a run's)")
    for key, path in (("--data", d.path), ("monitor.knn_train", m.knn_train), ("monitor.knn_val", m.knn_val)):
        # A run folder inside an ImageFolder would be read as one of its classes by the next job.
        if path and Path(path).is_dir() and out.is_relative_to(Path(path).resolve()):
            raise UsageError(f"--out {cfg.run.out} is inside {key} {path}; put the run folder outside the data")
    check_writable(out, "--out", folder=True)  # before the loader and any rendezvous, on every rank
    r = cfg.run.resume
    if r not in ("auto", "none") and not Path(r).is_file():
        raise UsageError(f"--resume {r}: no such checkpoint; pass auto, none or a checkpoint file")


def _check_ranges(cfg: Config) -> None:
    """Numbers that would train nothing, or fail only hours in (a zero interval is a division
    by zero at the first step; a NaN learning rate a run of NaN losses). NaN fails every test."""
    d, m, o, s, l, r = cfg.data, cfg.model, cfg.optim, cfg.schedule, cfg.loss, cfg.run
    checks = (
        ("data.workers", d.workers, d.workers >= 0, "0 (decode in the training process) or more"),
        ("data.seed", d.seed, d.seed >= 0, "0 or more"),
        ("model.proj_hidden", m.proj_hidden, m.proj_hidden >= 1, "at least 1"),
        ("model.proj_dim", m.proj_dim, m.proj_dim >= 1, "at least 1"),
        ("optim.base_lr", o.base_lr, 0 < o.base_lr < math.inf, "a positive number"),
        ("optim.weight_decay", o.weight_decay, 0 <= o.weight_decay < math.inf, "0 or more"),
        ("optim.momentum", o.momentum, 0 <= o.momentum < 1, "in [0, 1)"),
        ("optim.trust_coefficient", o.trust_coefficient, 0 < o.trust_coefficient < math.inf, "a positive number"),
        ("optim.min_lr_ratio", o.min_lr_ratio, 0 <= o.min_lr_ratio <= 1, "in [0, 1]"),
        ("schedule.ema_momentum", s.ema_momentum, 0 <= s.ema_momentum <= 1, "in [0, 1]"),
        ("loss.lam", l.lam, 0 <= l.lam < math.inf, "0 or more"),
        ("loss.eta", l.eta, 0 < l.eta < math.inf, "a positive number (the ridge that keeps K + eta I invertible)"),
        ("loss.min_tau", l.min_tau, 0 < l.min_tau < math.inf, "a positive number"),
        ("run.checkpoint_every_steps", r.checkpoint_every_steps, r.checkpoint_every_steps >= 1, "at least 1"),
        ("run.checkpoint_every_minutes", r.checkpoint_every_minutes, r.checkpoint_every_minutes > 0,
         "a positive number (inf: by steps only)"),
        ("run.log_every_steps", r.log_every_steps, r.log_every_steps >= 1, "at least 1"),
        ("dist.timeout_minutes", cfg.dist.timeout_minutes, cfg.dist.timeout_minutes > 0, "a positive number"),
    )
    for key, value, ok, need in checks:
        if not ok:
            raise UsageError(f"{key}={value}; it must be {need}")


def check_flag_conflicts(overrides: list[str], flags: dict[str, tuple[str, Any]]) -> None:
    """flags: config key -> (flag, its value or None when not given). A key set both by a given
    flag and by a key=value override is an error: which was meant is a guess, so say so."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        flag, value = flags.get(key, ("", None))
        if value is not None:
            raise UsageError(f"{flag} and {item} both set {key}; give one")


def get_config(preset: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A preset by name, or a run's saved config.json (to repeat or extend that run exactly; its
    run.resume and schedule.steps are this invocation's to set), then the `key=value` overrides
    in order."""
    if preset.endswith(".json"):
        cfg = _config_file(Path(preset))
    elif preset in PRESETS:
        cfg = PRESETS[preset]()
    else:
        raise UsageError(f"unknown config preset {preset!r}; choose one of {', '.join(PRESETS)} "
                         "or a run's config.json")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"config override {item!r} is not key=value (e.g. optim.base_lr=0.5)")
        _set(cfg, key.strip(), value.strip())
    return cfg


def _config_file(path: Path) -> Config:
    try:
        d = json.loads(path.read_text())
    except OSError as e:
        raise UsageError(f"--config {path}: {e.strerror}") from None
    except ValueError:
        raise UsageError(f"--config {path} is not JSON; pass a run's config.json or a preset name") from None
    if not isinstance(d, dict) or not all(isinstance(v, dict) for v in d.values()):
        raise UsageError(f"--config {path} is not a run's config.json (groups of fields, as pretrain writes it)")
    cfg = Config.from_dict(d)
    # Where that invocation started and stopped, not what it trained: a replay would otherwise
    # stop at once at the old --steps, or skip its own run folder's checkpoints.
    cfg.run.resume, cfg.schedule.steps = RunConfig.resume, ScheduleConfig.steps
    return cfg


def _resolve(cfg: Config, key: str) -> tuple[Any, str]:
    """The group object and field name for a dotted key, or a bare field name unique across groups."""
    groups = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    group, dot, name = key.rpartition(".")
    if dot:
        if group in groups and name in {f.name for f in dataclasses.fields(groups[group])}:
            return groups[group], name
    else:
        owners = [g for g in groups.values() if name in {f.name for f in dataclasses.fields(g)}]
        if len(owners) == 1:
            return owners[0], name
    raise UsageError(f"unknown config key {key!r}; use group.field, e.g. optim.base_lr "
                     f"(groups: {', '.join(groups)})")


def _set(cfg: Config, key: str, value: Any) -> None:
    obj, name = _resolve(cfg, key)
    hint = typing.get_type_hints(type(obj))[name]
    try:
        setattr(obj, name, _parse(value, hint))
    except ValueError:
        raise UsageError(f"config key {key!r}: cannot read {value!r} as {_type_name(hint)}") from None


def _parse(value: Any, hint: Any) -> Any:
    args = typing.get_args(hint)
    if type(None) in args:  # X | None
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        hint = next(a for a in args if a is not type(None))
    if not isinstance(value, str):
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, hint):
            return value
        raise ValueError(value)
    if hint is bool:
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(value)
    return hint(value)


def _type_name(hint: Any) -> str:
    return " or ".join(getattr(a, "__name__", str(a)) for a in (typing.get_args(hint) or (hint,)))
