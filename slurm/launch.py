"""Launch MVEB pretraining (or a shard build, a folder's validation) on SLURM with submitit.

    python slurm/launch.py --nodes 4 --data /data/imagenet/train.beton --out runs/rn50
        4 nodes x 8 GPUs, one task per GPU: world size 32, 128 per GPU, global batch 4096,
        LR 0.3 x 4096 / 256 = 4.8. The run folder gets config.json and launch.json; the job
        requeues itself on preemption or timeout and resumes from the newest checkpoint.
    python slurm/launch.py --nodes 4 --dry-run       # print the sbatch script, submit nothing
    python slurm/launch.py --local --gpus-per-node 0 --tasks-per-node 2 --config demo --data DIR
    python slurm/launch.py shards --src /data/imagenet/train --out /data/imagenet/train.beton
    python slurm/launch.py validate --src /data/imagenet/train   # broken files, for DALI
    python slurm/launch.py bench --nodes 4 --out runs/bench-4x8   # what DDP costs a step on 32 GPUs

Rerunning the same command with the same --out resumes the run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    # Run as a script: import the repository's packages, not this folder's files as top-level modules.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from mveb.cli import OneLineParser  # noqa: E402
from mveb.errors import UsageError  # noqa: E402
from mveb.files import check_writable, write_atomic  # noqa: E402
from slurm.plan import BatchPlan, Resources, batch_plan, parse_time, resources  # noqa: E402

PROG = "python slurm/launch.py"
# submitit stops requeueing after this many time limits (preemptions do not count); its
# default of 3 would end an 800-epoch run that needs more 72-hour slots than that.
MAX_TIMEOUT_REQUEUES = 100


def _add_cluster_args(p: argparse.ArgumentParser, cpus_per_task: int, time: str) -> None:
    g = p.add_argument_group("SLURM")
    g.add_argument("--partition", default=None)
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--time", default=time, help="time limit: HH:MM:SS, D-HH:MM:SS or minutes")
    g.add_argument("--cpus-per-task", type=int, default=cpus_per_task, help="CPUs per task (data loading workers)")
    g.add_argument("--mem", default=None, help="memory per node, as sbatch --mem (e.g. 480G)")
    g.add_argument("--constraint", default=None, help="node features, as sbatch --constraint")
    g.add_argument("--exclude", default=None, help="nodes to avoid, as sbatch --exclude")
    g.add_argument("--dry-run", action="store_true", help="print the sbatch script and the plan; submit nothing")
    g.add_argument("--local", action="store_true",
                   help="run on this machine with submitit's LocalExecutor (one node) and wait for the result")


def train_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node, one task each; 0 = CPU tasks (default 8)")
    p.add_argument("--tasks-per-node", type=int, default=None, help="tasks per node with --gpus-per-node 0 (default 1)")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch-size", type=int, default=None, help="global batch, split over all tasks")
    batch.add_argument("--batch-per-gpu", type=int, default=None, help="batch per task (default: the preset's)")
    p.add_argument("--config", default="imagenet_rn50",
                   help="recipe preset from train/config.py (imagenet_rn50, demo), or a run's config.json: its "
                        "data, run folder and batch unless --data/--out/--batch-* say otherwise; it resumes "
                        "from its run folder and runs the whole schedule unless schedule.steps=N")
    p.add_argument("--data", default=None, help="ImageFolder root or .beton shard, as seen from the compute nodes")
    p.add_argument("--out", default=None, help="run folder on a shared filesystem (default: the preset's run.out)")
    _add_cluster_args(p, cpus_per_task=10, time="72:00:00")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. schedule.epochs=100")
    return p


def cpu_job_parser(command: str, description: str, time: str) -> argparse.ArgumentParser:
    """`mveb validate` or `mveb shards` with its own options (defined once, in pipeline/cli.py) as a
    one-node CPU job, its CPUs as the decoding or writer processes."""
    from pipeline import cli as pipeline_cli

    holder = OneLineParser(prog=PROG).add_subparsers(parser_class=OneLineParser)
    pipeline_cli.register(holder)
    p = holder.choices[command]
    p.prog = f"{PROG} {command}"
    p.description = description
    p.set_defaults(workers=None)  # None: one process per CPU of the job (--cpus-per-task)
    _add_cluster_args(p, cpus_per_task=32, time=time)
    return p


def bench_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=f"{PROG} bench", description=(
        "`mveb bench step` as a multi-node job: every task times the training step alone and under "
        "DDP on synthetic data; rank 0 writes the exposed communication per step to OUT/bench.json."))
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node, one task each; 0 = CPU tasks (default 8)")
    p.add_argument("--tasks-per-node", type=int, default=None, help="tasks per node with --gpus-per-node 0 (default 1)")
    p.add_argument("--batch-size", type=int, default=None, help="batch per task (default 256 on GPUs, 8 on CPUs)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    p.add_argument("--config", default=None, choices=["imagenet_rn50", "demo"],
                   help="model preset (default: imagenet_rn50 on GPUs, demo on CPUs)")
    p.add_argument("--compile", action="store_true", help="time the compiled step")
    p.add_argument("--profile", action="store_true", help="also rank 0's device time by kind (NCCL: communication)")
    p.add_argument("--out", required=True, help="folder for bench.json and the job's logs, on a shared filesystem")
    _add_cluster_args(p, cpus_per_task=10, time="30")
    return p


def _cluster_resources(a: argparse.Namespace, name: str, **layout: Any) -> Resources:
    return resources(cpus_per_task=a.cpus_per_task, time_min=parse_time(a.time), partition=a.partition,
                     account=a.account, qos=a.qos, mem=a.mem, constraint=a.constraint, exclude=a.exclude,
                     name=name, **layout)


def sbatch_script(res: Resources, folder: Path) -> str:
    """The script submitit's SlurmExecutor would write for this request."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **res.sbatch_parameters())


def _print_plan(res: Resources, plan: BatchPlan | None) -> None:
    unit = f"{res.gpus_per_node} GPUs" if res.gpus_per_node else f"{res.tasks_per_node} CPU tasks"
    each = "one task per GPU, " if res.gpus_per_node else ""
    print(f"nodes: {res.nodes} x {unit} per node = world size {res.world_size} "
          f"({each}{res.cpus_per_task} CPUs per task)")
    if plan is not None:
        print(f"batch: {plan.per_rank} per task x {plan.world_size} = global batch {plan.global_batch}")
        print(f"lr: {plan.base_lr:g} x {plan.global_batch} / 256 = {plan.lr:g}")


def _check_submit(a: argparse.Namespace, res: Resources) -> None:
    if a.local:
        if res.nodes != 1:
            raise UsageError(f"--local runs on this machine only: use --nodes 1 (got --nodes {res.nodes})")
        if res.gpus_per_node:
            import torch

            have = torch.cuda.device_count()
            if have < res.gpus_per_node:
                raise UsageError(f"--local with --gpus-per-node {res.gpus_per_node} but this machine has {have} GPUs; "
                                 "pass --gpus-per-node 0 --tasks-per-node N for CPU tasks")
    elif shutil.which("sbatch") is None:
        raise UsageError("sbatch not found on PATH: run this on a SLURM login node, or pass --local to run on "
                         "this machine, or --dry-run to print the job script")


def _submit(a: argparse.Namespace, res: Resources, folder: Path, fn: Callable[..., Any], *args: Any,
            **kwargs: Any) -> Any:
    import submitit

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only dataset mount, a quota
        raise UsageError(f"cannot create the job folder {folder} ({e.strerror})") from None
    executor = submitit.AutoExecutor(folder=folder, cluster="local" if a.local else "slurm",
                                     slurm_max_num_timeout=MAX_TIMEOUT_REQUEUES)
    if a.local:
        executor.update_parameters(**res.local_parameters())
    else:
        executor.update_parameters(**{f"slurm_{k}": v for k, v in res.sbatch_parameters().items()})
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's errors; we say it once
            job = executor.submit(fn, *args, **kwargs)
    except submitit.core.utils.FailedJobError as e:  # sbatch said no: bad partition, account, QOS...
        reason = (str(e).strip().splitlines() or ["no reason given"])[-1].removeprefix("sbatch: error: ")
        raise UsageError(f"sbatch refused the job: {reason}") from None
    print(f"submitted job {job.job_id} ({'local' if a.local else 'slurm'})")
    print(f"logs: {job.paths.stdout}")
    print(f"      {job.paths.stderr}")
    if not a.local:
        print(f"watch: squeue -j {job.job_id}; tail -f {job.paths.stderr}")
    return job


def _last_error(trace: str) -> str:
    """The exception line of a formatted traceback, its class named without its module."""
    lines = trace.strip().splitlines()
    # Frames and their source lines are indented; the exception line is the first one after the last of them.
    frames_end = max((i + 1 for i, line in enumerate(lines) if line[:1].isspace()), default=0)
    name, sep, message = lines[min(frames_end, len(lines) - 1)].partition(": ")
    if re.fullmatch(r"[\w.]+", name):
        name = name.rsplit(".", 1)[-1]
    return name + sep + message


def _wait_local(job: Any) -> int:
    """--local runs in the foreground: print rank 0's result, or the failed task's error in one line as
    the CLI would (exit code 2 for a UsageError, else 1); Ctrl-C cancels the job."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    try:
        result = job.results()[0]
    except KeyboardInterrupt:
        job.cancel()
        raise
    except UncompletedJobError as e:  # FailedJobError too: the task raised
        # results() raised the error of the failed task with the smallest id; its log is the one to read.
        failed = next((t for t in map(job.task, range(job.num_tasks)) if t.exception() is not None), job)
        # submitit's message holds the task's traceback between two rules of dashes.
        trace = re.search(r"^-+\n(.*)\n-+$", str(e), flags=re.MULTILINE | re.DOTALL)
        if isinstance(e, FailedJobError) and trace is not None:
            reason = _last_error(trace.group(1))
        else:  # killed (out of memory, a signal): no traceback to quote
            reason = f"the task left no result (state: {failed.state})"
        sys.stderr.write(f"{PROG}: error: the job failed: {reason}; full log: {failed.paths.stderr}\n")
        return 2 if reason.startswith("UsageError: ") else 1
    print(json.dumps(result, indent=1, default=str))
    return 0


def launch_training(a: argparse.Namespace) -> int:
    from train.config import check_config, check_flag_conflicts, get_config

    # A run's config.json names the job after its run folder.
    name = Path(a.config).parent.name if a.config.endswith(".json") else a.config
    res = _cluster_resources(a, f"mveb-{name}", nodes=a.nodes, gpus_per_node=a.gpus_per_node,
                             tasks_per_node=a.tasks_per_node)
    batch_flag = ("--batch-size", a.batch_size) if a.batch_size is not None else ("--batch-per-gpu", a.batch_per_gpu)
    check_flag_conflicts(a.overrides, {"data.path": ("--data", a.data), "run.out": ("--out", a.out),
                                       "data.batch_size": batch_flag, "data.global_batch_size": batch_flag})
    cfg = get_config(a.config, a.overrides)
    if a.data is not None:
        cfg.data.path = str(Path(a.data).resolve())
    if a.out is not None:
        cfg.run.out = a.out
    cfg.run.out = str(Path(cfg.run.out).resolve())
    # Either flag replaces a global batch that a run's config.json may carry.
    global_batch = a.batch_size if a.batch_size is not None or a.batch_per_gpu is not None else cfg.data.global_batch_size
    plan = batch_plan(res.world_size, cfg.optim.base_lr, global_batch, a.batch_per_gpu, cfg.data.batch_size)
    cfg.data.batch_size, cfg.data.global_batch_size = plan.per_rank, None
    run_dir = Path(cfg.run.out)
    folder = run_dir / "submitit"
    # A dry run without --data shows the plan alone; given --data, it fails where the submission would.
    if a.data is not None or not a.dry_run:
        check_config(cfg, res.world_size)

    _print_plan(res, plan)
    print(f"run folder: {run_dir}")
    if a.dry_run:
        print(f"data: {cfg.data.path or '(not set: pass --data)'}")
        print(sbatch_script(res, folder))
        return 0

    from slurm.job import TrainJob

    _check_submit(a, res)
    job = _submit(a, res, folder, TrainJob(cfg.to_dict()))
    write_atomic(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    launch = {"job_id": job.job_id, "executor": "local" if a.local else "slurm", "nodes": res.nodes,
              "tasks_per_node": res.tasks_per_node, "gpus_per_node": res.gpus_per_node,
              "world_size": res.world_size, "batch_per_task": plan.per_rank, "global_batch": plan.global_batch,
              "lr": plan.lr, "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
              "argv": sys.argv}
    write_atomic(run_dir / "launch.json", json.dumps(launch, indent=2) + "\n")
    print(f"config: {run_dir / 'config.json'}")
    return _wait_local(job) if a.local else 0


def _job_workers(a: argparse.Namespace, res: Resources) -> int:
    """--workers of a CPU job, checked here: the job would fail on a bad one only once it runs."""
    from pipeline.images import decoding_processes

    # Unset means one per CPU of the job's task, not of this login node.
    return decoding_processes(a.workers if a.workers is not None else res.cpus_per_task)


def _dry_run_prints(a: argparse.Namespace, res: Resources, folder: Path, src: Path) -> bool:
    """A CPU job's dry run prints its script (True); a submission checks its --src first."""
    if a.dry_run:
        print(sbatch_script(res, folder))
        return True
    if not src.is_dir():
        raise UsageError(f"--src {src} is not a folder; pass an ImageFolder root (one subfolder per class)")
    _check_submit(a, res)
    return False


def launch_shards(a: argparse.Namespace) -> int:
    from pipeline.shards import check_shard_options
    from slurm.job import CpuJob, shard_job

    res = _cluster_resources(a, "mveb-shards", nodes=1, gpus_per_node=0, tasks_per_node=1)
    check_shard_options(a.max_res, a.quality, a.limit, a.timeout)
    workers = _job_workers(a, res)
    src, out = Path(a.src).resolve(), Path(a.out).resolve()
    check_writable(out, "--out")
    folder = out.parent / f"{out.name}.submitit"
    _print_plan(res, None)
    print(f"shard: {src} -> {out}")
    if _dry_run_prints(a, res, folder, src):
        return 0
    job = _submit(a, res, folder, CpuJob(shard_job, str(src), str(out), max_res=a.max_res, quality=a.quality,
                                         workers=workers, limit=a.limit, classes=a.classes, timeout_s=a.timeout,
                                         progress=False))
    print(f"report (when done): {out}.report.json")
    return _wait_local(job) if a.local else 0


def launch_validate(a: argparse.Namespace) -> int:
    from pipeline.validate import kept_report
    from slurm.job import CpuJob, validate_job

    res = _cluster_resources(a, "mveb-validate", nodes=1, gpus_per_node=0, tasks_per_node=1)
    workers = _job_workers(a, res)
    src = Path(a.src).resolve()
    report = Path(a.report).resolve() if a.report else src.parent / f"{src.name}.validate.json"
    # None: the job itself falls back to the cache if it cannot write beside the dataset after all.
    chosen = str(report) if a.report else None
    if not a.report and src.is_dir() and not os.access(src.parent, os.W_OK):
        # A read-only dataset mount: the report goes where the DALI loader looks next.
        report = kept_report(src)
        chosen = str(report)
        print(f"note: {src.parent} is not writable; the report is kept in the cache instead, where the DALI loader "
              "reads it (keep MVEB_CACHE_DIR the same for training)")
    folder = report.parent / f"{src.name}.validate.submitit"  # beside the report, which is writable
    fix_list = str(Path(a.fix_list).resolve()) if a.fix_list else None
    check_writable(chosen, "--report")
    check_writable(fix_list, "--fix-list")
    _print_plan(res, None)
    print(f"validate: {src} -> {report}")
    if _dry_run_prints(a, res, folder, src):
        return 0
    job = _submit(a, res, folder, CpuJob(validate_job, str(src), chosen, fix_list, workers))
    print(f"report (when done): {report}")
    return _wait_local(job) if a.local else 0


def launch_bench(a: argparse.Namespace) -> int:
    from mveb.bench_step import check_counts
    from slurm.job import bench_job

    res = _cluster_resources(a, "mveb-bench", nodes=a.nodes, gpus_per_node=a.gpus_per_node,
                             tasks_per_node=a.tasks_per_node)
    if res.world_size < 2:
        raise UsageError(f"world size {res.world_size}: the DDP cost needs 2 tasks or more "
                         "(for one GPU run `mveb bench step` directly)")
    check_counts(a.batch_size, a.steps)
    out = Path(a.out).resolve()
    check_writable(out, "--out", folder=True)
    _print_plan(res, None)
    print(f"report (when done): {out / 'bench.json'}")
    if a.dry_run:
        print(sbatch_script(res, out / "submitit"))
        return 0
    _check_submit(a, res)
    job = _submit(a, res, out / "submitit", bench_job, str(out / "bench.json"), batch_size=a.batch_size,
                  steps=a.steps, config=a.config, compile=a.compile, profile=a.profile)
    return _wait_local(job) if a.local else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["shards"]:
            parser = cpu_job_parser("shards", "Build an FFCV shard (`mveb shards`) as a one-node CPU job.", "12:00:00")
            return launch_shards(parser.parse_args(argv[1:]))
        if argv[:1] == ["validate"]:
            parser = cpu_job_parser("validate", "Find the broken images of a folder (`mveb validate`) as a one-node "
                                                "CPU job.", "4:00:00")
            return launch_validate(parser.parse_args(argv[1:]))
        if argv[:1] == ["bench"]:
            return launch_bench(bench_parser().parse_args(argv[1:]))
        return launch_training(train_parser().parse_args(argv))
    except UsageError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 2
    except BrokenPipeError:  # `--dry-run | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
