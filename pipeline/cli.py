"""`mveb validate`, `mveb shards` and the arguments of `mveb bench loader`."""

from __future__ import annotations

import argparse

from .recipe import SHARD_MAX_RES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="decode every image of an ImageFolder tree and report broken files",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--src", required=True, help="ImageFolder root (one subfolder per class)")
    p.add_argument("--report", default=None, help="JSON report path (default: SRC/../<name>.validate.json)")
    p.add_argument("--fix-list", default=None, help="write the list of decodable files (DALI file_list format)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: the CPUs this job may use)")
    p.set_defaults(func=_validate)

    p = sub.add_parser("shards", help="build an FFCV .beton shard from an ImageFolder tree",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--src", required=True, help="ImageFolder root (one subfolder per class)")
    p.add_argument("--out", required=True, help="output .beton path; a report is written beside it")
    p.add_argument("--max-res", type=int, default=SHARD_MAX_RES,
                   help="longest side stored (the crops come from it; keep it at least the photos' size)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of stored images")
    p.add_argument("--workers", type=int, default=None, help="writer processes (default: the CPUs this job may use)")
    p.add_argument("--limit", type=int, default=None, help="write at most this many images")
    p.add_argument("--classes", default=None, help="file with one class folder name per line (fixes label order)")
    p.add_argument("--timeout", type=float, default=None,
                   help="kill a hung writer after this many seconds (default: 300 + 0.25 per image per worker)")
    p.set_defaults(func=_shards)


def _validate(a: argparse.Namespace) -> int:
    from .validate import validate

    validate(a.src, a.report, a.fix_list, a.workers)
    return 0


def _shards(a: argparse.Namespace) -> int:
    from .shards import shards_command

    return shards_command(a.src, a.out, a.max_res, a.quality, a.workers, a.limit, a.classes, a.timeout)


def add_bench_loader_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="ImageFolder root")
    p.add_argument("--backends", default="ffcv,dali,torch", help="comma-separated backends to compare")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: the CPUs this job may use)")
    p.add_argument("--seconds", type=float, default=20.0, help="timed seconds per backend after warm-up")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (CUDA when present)")
    p.add_argument("--dtype", default="fp32", help="output dtype: fp32, or bf16/fp16 as the training step reads them")
    p.add_argument("--dali-tuning", default="", metavar="KEY=VALUE,...",
                   help="how the dali backend runs, e.g. hw_decoder_load=0.95,prefetch=2 (pipeline/dali_graph.py "
                        "DALITuning); train with the best as data.dali_tuning")
    p.add_argument("--json", default=None, help="write results as JSON here")
    p.set_defaults(func=_bench_loader)


def _bench_loader(a: argparse.Namespace) -> int:
    from .bench import bench_loader_command

    return bench_loader_command(a.data, a.backends, a.batch_size, a.workers, a.seconds, a.device, a.json, a.dtype,
                                a.dali_tuning)
