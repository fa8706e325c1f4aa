"""`mveb bench all`: loader, kernels and step benchmarks in one run.

Each part runs through its own subcommand (so `bench all` measures exactly what the parts
measure) and writes its JSON; this module adds one markdown summary with the date, machine
and versions, one results.json and one PNG chart. The README's numbers come from here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

from kernels.bench import row_label as kernels_label
from mveb.bench import Outcome, exit_status, one_line, outcomes, unmeasured
from mveb.bench_step import format_table as step_table
from mveb.bench_step import row_label as step_label
from mveb.devices import resolve_device
from mveb.errors import UsageError
from mveb.files import check_writable, write_atomic
from pipeline.bench import row_label as loader_label
from pipeline.images import check_image_folder


def _run(argv: list[str]) -> None:
    """Its exit code is left out: 1 says only that nothing was measured, which its JSON says too."""
    from mveb.cli import build_parser

    args = build_parser().parse_args(argv)
    args.func(args)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "host": platform.node(), "cpus": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "versions": {d: _version(d) for d in ("torch", "torchvision", "triton", "ffcv", "numba",
                                                   "nvidia-dali-cuda120", "nvidia-dali-cuda130")}}


def _part(name: str, argv: list[str], json_path: Path, results: dict[str, Any],
          label: Callable[[dict[str, Any]], str]) -> Outcome:
    """Run one benchmark; a part that fails is recorded, and the others still run. label: the
    name of one of its result rows. Returns why the part measured nothing (None if it did)."""
    print(f"\n== bench {name}", flush=True)
    try:
        _run(argv + ["--json", str(json_path)])
        results[name] = json.loads(json_path.read_text())
        outcome = (name, unmeasured(outcomes(results[name]["results"], label)))
    except Exception as e:  # noqa: BLE001 - one broken backend must not cost the whole run
        results[name] = {"error": one_line(e)}
        print(f"bench {name} failed: {results[name]['error']}", flush=True)
        outcome = (name, results[name]["error"])
    # After every part: a run cut short (a host's time limit) keeps the parts it finished.
    write_atomic(json_path.parent / "results.json", json.dumps(results, indent=1))
    return outcome


PARTS = ("loader", "kernels", "step")


def bench_all(device: str, data: str | None, out: Path, compile: bool = True,
              parts: tuple[str, ...] = PARTS) -> list[Outcome]:
    """Run `parts` (loader, kernels, step) into `out`. The parts not run this time are kept from
    an earlier results.json in `out`, so a long run can be split over calls, or one part rerun.
    Returns each part run this time with why it measured nothing (None where it measured)."""
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise UsageError(f"--parts takes a comma list of {', '.join(PARTS)}, got {','.join(parts)!r}")
    dev = resolve_device(device)
    gpu = dev.type == "cuda"
    if data is not None and ("loader" in parts or "step" in parts):
        check_image_folder(data)  # a mistyped --data is the user's error, not two failed parts
    check_writable(out, "--out", folder=True)
    out.mkdir(parents=True, exist_ok=True)
    earlier = out / "results.json"
    results: dict[str, Any] = json.loads(earlier.read_text()) if earlier.exists() and set(parts) != set(PARTS) else {}
    if results.get("device", str(dev)) != str(dev):  # its parts would be summarized as this device's
        raise UsageError(f"{earlier} holds a run on {results['device']}, not {dev}: --parts would merge the two; "
                         f"use another --out")
    if data is None and ("loader" in parts or "step" in parts):
        from pipeline.demo_photos import build_photo_folder

        # ImageNet-like JPEG sizes (about 500 px), so decode cost is representative, and enough
        # images for several batches per epoch, so epoch boundaries do not dominate.
        data = str(build_photo_folder(out / "photos", per_class_train=256 if gpu else 8, per_class_val=1,
                                      side=500) / "train")
    results.update({"machine": machine(), "device": str(dev)})
    loader_b, step_b = (256, 256) if gpu else (32, 8)
    ran: list[Outcome] = []
    if "loader" in parts:
        ran.append(_part("loader", ["bench", "loader", "--data", data, "--backends", "dali,ffcv,torch",
                                    "--device", dev.type, "--batch-size", str(loader_b),
                                    "--seconds", "15" if gpu else "10", "--dtype", "bf16" if gpu else "fp32"],
                         out / "loader.json", results, loader_label))
    if "kernels" in parts:
        # The variants that tell the story; each case is also profiled once, so keep the list short.
        ran.append(_part("kernels", ["bench", "kernels", "--device", dev.type, "--seconds", "0.3",
                                     "--impls", "reference-literal,reference,torch,triton,triton-eager"]
                         + ([] if gpu else ["--batch-sizes", "128,256"]),
                         out / "kernels.json", results, kernels_label))
    if "step" in parts and gpu:
        # The fast-path batch (vs DALI-fed, most of the targets) first, then the official batch (vs
        # the official-style step): each is kept as soon as it ends, if a time limit cuts the rest.
        fast = ["--compile"] if compile else []
        ran.append(_part("step", ["bench", "step", "--device", "cuda", "--batch-size", str(step_b), "--no-official",
                                  "--profile", "--fp16", "--loader", "synthetic,dali", "--priority-stream",
                                  "--data", data] + fast, out / "step.json", results, step_label))
        ran.append(_part("step_b128", ["bench", "step", "--device", "cuda", "--batch-size", "128", "--profile",
                                       "--fp16"] + fast, out / "step_b128.json", results, step_label))
    elif "step" in parts:
        ran.append(_part("step", ["bench", "step", "--device", "cpu", "--batch-size", str(step_b), "--profile",
                                  "--loader", "synthetic,torch", "--data", data],
                         out / "step.json", results, step_label))
    write_atomic(out / "results.json", json.dumps(results, indent=1))
    write_atomic(out / "summary.md", summary(results))
    chart(results, out / "chart.png")
    print("\n" + summary(results))
    print(f"written: {out / 'summary.md'}, {out / 'results.json'}, {out / 'chart.png'}")
    return ran


def summary(results: dict[str, Any]) -> str:
    m = results["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v != "not installed")
    lines = [f"# mveb bench all ({m['date']})", "",
             f"Machine: {m['gpu'] or 'no GPU'}, {m['cpus']} CPU cores, Python {m['python']}; {versions}.", ""]
    loader = results.get("loader", {})
    if loader:  # a part not run (--parts) gets no section, not a "failed" line
        lines += ["## Loader (images/s, each image = all views)", ""]
    if "results" in loader:
        lines += [f"Views {loader['views']}, batch {loader['batch_size']}, {loader['workers']} workers, "
                  f"device {loader['device']}.", "", "| backend | images/s | compile s | note |", "|---|---|---|---|"]
        for r in loader["results"]:
            ips = f"{r['images_per_s']:.1f}" if "images_per_s" in r else "-"
            comp = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
            lines.append(f"| {r['backend']} | {ips} | {comp} | {r.get('skipped') or r.get('error', '')} |")
    elif loader:
        lines.append(f"failed: {loader.get('error')}")
    kern = results.get("kernels", {})
    if kern:
        lines += ["", f"## MVEB loss, fwd+bwd, {kern.get('views', 8)} views, D={kern.get('dim', 2048)} (ms)", ""]
    if "results" in kern:
        lines += ["| B | impl | ms | GPU busy ms | launches | syncs | peak MiB | note |", "|---|---|---|---|---|---|---|---|"]
        num = lambda v, f: format(v, f) if v is not None else "-"
        for r in kern["results"]:
            ms = f"{r['ms']:.3f}" if r.get("ms") else "-"
            lines.append(f"| {r['batch']} | {r['impl']} | {ms} | {num(r.get('gpu_ms'), '.3f')} | "
                         f"{num(r.get('launches'), 'd')} | {num(r.get('syncs'), 'd')} | {num(r.get('peak_mib'), '.0f')} | "
                         f"{r.get('skipped') or ''} |")
    elif kern:
        lines.append(f"failed: {kern.get('error')}")
    for key in ("step_b128", "step"):
        if key in results:
            lines += ["", f"## Training step ({key.replace('_', ' ')}), ms per step by phase", ""]
            st = results[key]
            lines.append(step_table(st) if "results" in st else f"failed: {st.get('error')}")
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(22, 4.5))
    loader = [r for r in results.get("loader", {}).get("results", []) if "images_per_s" in r]
    axes[0].bar([r["backend"] for r in loader], [r["images_per_s"] for r in loader], color="tab:blue")
    axes[0].set_title("loader images/s (all views)")
    kern = [r for r in results.get("kernels", {}).get("results", []) if r.get("ms")]
    for impl in dict.fromkeys(r["impl"] for r in kern):
        pts = [(r["batch"], r["ms"]) for r in kern if r["impl"] == impl]
        axes[1].plot(*zip(*pts), marker="o", label=impl)
    axes[1].set(xscale="log", yscale="log", xlabel="B", ylabel="ms", title="MVEB loss fwd+bwd, 8 views")
    batches = sorted({r["batch"] for r in kern})
    axes[1].set_xticks(batches, [str(b) for b in batches], minor=False)
    axes[1].set_xticks([], minor=True)
    if kern:
        axes[1].legend(fontsize=8)
    steps = [r for key in ("step_b128", "step") for r in results.get(key, {}).get("results", []) if "error" not in r]
    axes[2].barh([f"{r['variant']} B{r['batch_size']}" for r in steps], [r["samples_per_s"] for r in steps],
                 color="tab:green")
    axes[2].set_title("training step samples/s")
    _work_chart(axes[3], [r for r in steps if "device" in r])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _work_chart(ax: Any, rows: list[dict[str, Any]]) -> None:
    """Where each profiled step variant's device time goes: one stacked bar per variant, idle last."""
    kinds = list(dict.fromkeys(k for r in rows for k in r["device"]["kinds"]))
    labels = [f"{r['variant']} B{r['batch_size']}" for r in rows]
    left = [0.0] * len(rows)
    for kind in kinds:
        ms = [r["device"]["kinds"].get(kind, 0.0) for r in rows]
        ax.barh(labels, ms, left=left, label=kind)
        left = [a + b for a, b in zip(left, ms)]
    # idle = wall - busy (busy is the union over streams; the kinds' sum is larger when they overlap)
    idle = [max(0.0, r["device"]["wall_ms"] - r["device"]["busy_ms"]) for r in rows]
    ax.barh(labels, idle, left=left, label="idle", color="lightgrey")
    ax.set(xlabel="ms per step", title="device time by kind (profiled steps)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def main(args: argparse.Namespace) -> int:
    """Exit code 1 when no part run this time measured anything (summary.md says why each did not)."""
    return exit_status("all", bench_all(args.device, args.data, Path(args.out), compile=not args.no_compile,
                                        parts=tuple(p.strip() for p in args.parts.split(",") if p.strip())))
