"""`mveb bench step`: samples/s of the full MVEB training step, and where each step's time goes.

Every variant runs in the same process, one after the other, so ratios compare like with
like on a shared, noisy machine:
- `official-style`: the official code's step (one backbone pass per view, the literal
  B x B x D entropy, fp16 + GradScaler on GPUs, a per-parameter LARS loop), the baseline;
- `mveb`: this trainer's step on synthetic data (grouped by resolution, fused loss, foreach
  LARS, bf16), the compute ceiling;
- `mveb fp16` (with --fp16, CUDA): the same step under fp16 autocast and a GradScaler. torch
  runs BatchNorm through cuDNN for fp16 and through its own kernels for bf16, so the two can
  differ in speed as well as in range;
- `mveb+compile`: the same with the online and momentum backbones compiled (with --compile);
- `mveb <loader>` (or `mveb+compile <loader>` with --compile): the fastest step above fed by
  a real loader, with its data-wait fraction and its ratio to that step on synthetic data;
- `... <loader> +priority` (with --priority-stream): the same with the step on a
  high-priority CUDA stream (precision.priority_stream).
With --profile each variant then runs 2 more steps under the torch profiler, and a second
table says what the device did in them by kind of work (mveb/device_profile.py): how busy it
was, and how much of it was convolution, batchnorm, elementwise, copies, the loader's kernels.
Under torchrun or srun (WORLD_SIZE > 1) it times what DDP costs instead (mveb/bench_ddp.py).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from mveb.bench import exit_status, one_line, outcomes
from mveb.device_profile import format_kinds, profile_steps
from mveb.devices import resolve_device, step_stream, synchronize
from mveb.errors import UsageError
from mveb.files import check_writable, write_atomic
from pipeline.batch import MultiCropBatch
from train.config import Config, get_config
from train.distributed import DistInfo
from train.phases import PHASES, PhaseTimer
from train.step import Trainer, amp_dtype


class PerParameterLARS(torch.optim.Optimizer):
    """LARS as the official code runs it: a Python loop over parameters (the baseline to beat)."""

    def __init__(self, params, lr: float, weight_decay: float, momentum: float, trust_coefficient: float) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None, found_inf: torch.Tensor | None = None):  # type: ignore[override]
        if found_inf is not None and found_inf.item():  # a host read each step, as the official loop does
            return
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    p_norm, u_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(p_norm)
                    q = torch.where(p_norm > 0, torch.where(u_norm > 0, g["eta"] * p_norm / u_norm, one), one)
                    dp = dp.mul(q)
                buf = self.state[p].setdefault("mu", torch.zeros_like(p))
                buf.mul_(g["momentum"]).add_(dp)
                p.add_(buf, alpha=-g["lr"])


def synthetic_batch(cfg: Config, device: torch.device, dtype: torch.dtype) -> MultiCropBatch:
    r, B = cfg.data.recipe(), cfg.data.batch_size
    g = torch.randn(r.n_global * B, 3, r.global_size, r.global_size, device=device, dtype=dtype)
    loc = torch.randn(r.n_local * B, 3, r.local_size, r.local_size, device=device, dtype=dtype)
    return MultiCropBatch(g.contiguous(memory_format=torch.channels_last),
                          loc.contiguous(memory_format=torch.channels_last), None)


def run_variant(name: str, cfg: Config, device: torch.device, batches: Iterator[MultiCropBatch],
                steps: int, warmup: int, per_parameter_lars: bool = False,
                dist: DistInfo | None = None, profile: int = 0, trace_dir: str | Path | None = None) -> dict[str, Any]:
    """Time `steps` training steps after `warmup` ones; phases from the trainer's PhaseTimer.
    dist: the process group's view for a DDP step (default: one process, no communication).
    profile: that many more steps under the profiler, their device work by kind in "device";
    trace_dir: their timeline there too, one Chrome trace per variant (its path in "trace")."""
    dist = dist or DistInfo(rank=0, world_size=1, local_rank=0, device=device, is_distributed=False)
    with step_stream(device, cfg.precision.priority_stream):
        return _run_variant(name, cfg, device, batches, steps, warmup, per_parameter_lars, dist, profile, trace_dir)


def _run_variant(name: str, cfg: Config, device: torch.device, batches: Iterator[MultiCropBatch], steps: int,
                 warmup: int, per_parameter_lars: bool, dist: DistInfo, profile: int,
                 trace_dir: str | Path | None) -> dict[str, Any]:
    torch.manual_seed(0)
    timer = PhaseTimer(device, enabled=True)
    trainer = Trainer(cfg, dist, steps_per_epoch=1000, timer=timer)
    if per_parameter_lars:
        o = cfg.optim
        trainer.optimizer = PerParameterLARS(trainer.online.parameters(), lr=trainer.peak_lr,
                                             weight_decay=o.weight_decay, momentum=o.momentum,
                                             trust_coefficient=o.trust_coefficient)
    wait = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(device)
            timer.reset()
            wait, t0 = 0.0, time.perf_counter()
        t = time.perf_counter()
        with timer("data_wait"):
            batch = next(batches)
        wait += time.perf_counter() - t
        out = trainer.step(batch, 100 + i)  # past warmup, so the LR is a typical one
    synchronize(device)
    wall = time.perf_counter() - t0
    phases = timer.totals()
    B = cfg.data.batch_size
    step_ms = 1000 * wall / steps
    phase_ms = {p: 1000 * phases.get(p, 0.0) / steps for p in PHASES}
    row = {
        "variant": name, "batch_size": B, "steps": steps, "samples_per_s": B * steps / wall, "step_ms": step_ms,
        "data_wait_fraction": wait / wall, "phases_ms": phase_ms,
        "unaccounted_ms": step_ms - sum(phase_ms.values()), "loss": float(out["loss"]),
        "skipped_steps": trainer.skipped_steps,
        "grad_mib": sum(p.numel() * p.element_size() for p in trainer.online.parameters() if p.requires_grad) / 2**20,
    }
    if profile:
        timer.enabled = False  # its events would be profiled work of their own
        extra = itertools.count(100 + warmup + steps)
        trace = None
        if trace_dir:
            trace = Path(trace_dir) / f"{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}-b{B}.json"
            trace.parent.mkdir(parents=True, exist_ok=True)
            row["trace"] = str(trace)
        try:
            row["device"] = profile_steps(lambda: trainer.step(next(batches), next(extra)), device, profile, trace)
        except RuntimeError as e:  # a host whose profiler cannot start (CUPTI) keeps the timed row
            row["device_error"] = one_line(e)
    return row


def _loader_batches(backend: str, data: str, cfg: Config, device: torch.device, dtype: torch.dtype) -> Iterator[MultiCropBatch]:
    from pipeline.loaders import build_loader

    loader = build_loader(backend, data, cfg.data.recipe(), cfg.data.batch_size, device=device, dtype=dtype,
                          seed=0, rank=0, world_size=1, workers=cfg.data.workers,
                          dali_tuning=cfg.data.dali_tuning if backend == "dali" else "")
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def check_counts(batch_size: int | None, steps: int | None) -> None:
    if batch_size is not None and batch_size < 2:
        raise UsageError(f"--batch-size must be at least 2 (MVEB's entropy needs 2 samples), got {batch_size}")
    if steps is not None and steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")


def step_settings(config: str | None, batch_size: int | None, steps: int | None, on_gpu: bool,
                  overrides: tuple[str, ...]) -> tuple[Config, int, int]:
    """(config, timed steps, warmup steps) of a step benchmark, with or without torchrun."""
    cfg = get_config(config or ("imagenet_rn50" if on_gpu else "demo"), ["run.progress=false", *overrides])
    if batch_size is not None:
        cfg.data.batch_size = batch_size
    elif not (config or "").endswith(".json"):  # a run's config times that run's batch
        cfg.data.batch_size = 256 if on_gpu else 8
    return cfg, steps if steps is not None else (30 if on_gpu else 4), 10 if on_gpu else 2


def bench_step(device: str = "auto", batch_size: int | None = None, loaders: tuple[str, ...] = ("synthetic",),
               data: str | None = None, compile: bool = False, steps: int | None = None,
               official: bool = True, config: str | None = None, priority_stream: bool = False,
               profile: bool = False, fp16: bool = False, json_path: str | Path | None = None,
               overrides: tuple[str, ...] = (), trace_dir: str | Path | None = None) -> dict[str, Any]:
    """Every variant in one process; the report (see format_table). json_path: the report so far
    is written there after every variant, so a run cut short keeps what it measured. overrides:
    config KEY=VALUE items applied to the preset of every variant (e.g. data.workers=16). trace_dir:
    each profiled variant's timeline there (implies profile)."""
    check_counts(batch_size, steps)
    profile = profile or trace_dir is not None
    dev = resolve_device(device)
    on_gpu = dev.type == "cuda"
    cfg, steps, warmup = step_settings(config, batch_size, steps, on_gpu, overrides)
    real = [b for b in loaders if b != "synthetic"]
    if real and not data:
        raise UsageError(f"--loader {','.join(real)} needs --data (an ImageFolder)")
    if data and not Path(data).exists():
        raise UsageError(f"--data {data} does not exist")
    if fp16 and not on_gpu:
        raise UsageError("--fp16 times CUDA's fp16 autocast; a CPU step runs in fp32")
    check_writable(json_path, "--json")
    check_writable(trace_dir, "--trace", folder=True)
    dtype = amp_dtype(cfg.precision.amp, dev) or torch.float32

    results: list[dict[str, Any]] = []
    fed: list[str] = []  # the loader-fed variants
    name = "mveb"  # the synthetic step they feed

    def report() -> dict[str, Any]:
        """The rows so far, with the ratios whose baselines have run."""
        rate = {r["variant"]: r["samples_per_s"] for r in results if "error" not in r}
        for r in results:
            if "error" in r:
                continue
            if "mveb" in rate:
                r["ratio_to_mveb_synthetic"] = r["samples_per_s"] / rate["mveb"]
            if r["variant"] in fed and name in rate:
                r["ratio_to_synthetic"] = r["samples_per_s"] / rate[name]
        return {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if on_gpu else "cpu",
                "arch": cfg.model.arch, "recipe": cfg.data.recipe().to_dict(), "torch": torch.__version__,
                "overrides": list(overrides), "results": results}

    # A compiled variant spends minutes compiling before its first step: say what is running.
    bar = tqdm(total=int(official) + 1 + int(fp16) + int(compile) + len(real) * (1 + int(priority_stream)),
               desc="bench step", unit="variant")

    def attempt(variant: str, vcfg: Config, batches: Iterator[MultiCropBatch], **kw: Any) -> bool:
        """Run one variant; one that fails (a compile error, a broken loader) becomes an error
        row, and the variants after it still run."""
        bar.set_postfix_str(variant)
        try:
            results.append(run_variant(variant, vcfg, dev, batches, steps, warmup, profile=2 * profile,
                                       trace_dir=trace_dir, **kw))
            ok = True
        except Exception as e:  # noqa: BLE001 - the other variants are still worth measuring
            error = one_line(e)
            results.append({"variant": variant, "batch_size": vcfg.data.batch_size, "error": error})
            bar.write(f"bench step: {variant} failed: {error}")
            ok = False
        bar.update()
        if json_path:
            write_atomic(json_path, json.dumps(report(), indent=2))
        return ok

    if official:
        # fp16 as the official code on GPUs; on a CPU fp16 is emulated and would only measure that.
        off = replace(cfg, model=replace(cfg.model, per_view_forward=True),
                      loss=replace(cfg.loss, impl="reference-literal"),
                      precision=replace(cfg.precision, amp="fp16" if on_gpu else "fp32"))
        batch = synthetic_batch(off, dev, amp_dtype(off.precision.amp, dev) or torch.float32)
        attempt("official-style", off, itertools.repeat(batch), per_parameter_lars=True)
    batch = synthetic_batch(cfg, dev, dtype)
    # The baseline of the ratios: failed, it is an error row like any other (the table, and the
    # exit code when nothing ran, say so); the rows then have no ratio to it.
    attempt("mveb", cfg, itertools.repeat(batch))
    if fp16:
        half = replace(cfg, precision=replace(cfg.precision, amp="fp16"))
        attempt("mveb fp16", half, itertools.repeat(synthetic_batch(half, dev, torch.float16)))
    fast = cfg
    if compile:  # the loaders then feed the compiled step: the fast path is what they must keep busy
        compiled = replace(cfg, precision=replace(cfg.precision, compile=True))
        if attempt("mveb+compile", compiled, itertools.repeat(batch)):
            fast, name = compiled, "mveb+compile"
    for backend in real:
        fed.append(f"{name} {backend}")
        attempt(fed[-1], fast, _loader_batches(backend, data, fast, dev, dtype))
        if priority_stream:
            prio = replace(fast, precision=replace(fast.precision, priority_stream=True))
            fed.append(f"{name} {backend} +priority")
            attempt(fed[-1], prio, _loader_batches(backend, data, prio, dev, dtype))
    bar.close()
    return report()


def format_table(report: dict[str, Any]) -> str:
    """One row per variant. "x mveb": against the eager synthetic step; "x synthetic": a loader-fed
    step against the synthetic step it feeds (the same compile setting), both from the same run."""
    cols = ["variant", "B", "samples/s", "x mveb", "x synthetic", "step ms", "data wait"] + list(PHASES[1:]) + ["other"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['batch_size']} | failed: {r['error'][:120]} |" + " - |" * (len(cols) - 3))
            continue
        ph = r["phases_ms"]
        fed = f"{r['ratio_to_synthetic']:.3f}" if "ratio_to_synthetic" in r else "-"
        eager = f"{r['ratio_to_mveb_synthetic']:.2f}" if "ratio_to_mveb_synthetic" in r else "-"
        row = [r["variant"], str(r["batch_size"]), f"{r['samples_per_s']:.1f}", eager, fed, f"{r['step_ms']:.1f}", f"{100 * r['data_wait_fraction']:.1f}%"]
        row += [f"{ph[p]:.1f}" for p in PHASES[1:]] + [f"{r['unaccounted_ms']:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    profiled = [(r["variant"], r["device"]) for r in report["results"] if "device" in r]
    lines += [f"{r['variant']}: not profiled ({r['device_error']})" for r in report["results"] if "device_error" in r]
    if profiled:
        lines += ["", f"Device work by kind, ms per step ({'kernels' if report['device'].startswith('cuda') else 'aten ops'}"
                  ", 2 profiled steps):", "", format_kinds(profiled)]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Exit code 1 when no variant could be measured (the table says why each failed)."""
    from train.distributed import planned_world_size

    if planned_world_size() > 1:
        from mveb.bench_ddp import main as ddp_main

        return ddp_main(args)
    report = bench_step(args.device, args.batch_size, tuple(args.loader.split(",")), args.data, args.compile,
                        args.steps, official=not args.no_official, config=args.config,
                        priority_stream=args.priority_stream, profile=args.profile, fp16=args.fp16,
                        json_path=args.json, overrides=tuple(args.set), trace_dir=args.trace)
    print(f"MVEB step on {report['device_name']} ({report['arch']}), phases in ms per step:")
    print(format_table(report))
    return exit_status("step", outcomes(report["results"], row_label))


def row_label(row: dict[str, Any]) -> str:
    return row["variant"]
