"""`mveb`: one console script; each subcommand is a thin parser over a function tests call directly.

Subcommands register themselves from the package that owns them, so the argument surface
lives beside the code it drives.
"""

from __future__ import annotations

import argparse
import sys

from mveb.errors import UsageError


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad option as one line and exit code 2, no usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from kernels import cli as kernels_cli
    from mveb import bench, demo
    from pipeline import cli as pipeline_cli
    from train import cli as train_cli

    parser = OneLineParser(prog="mveb", description="MVEB self-supervised pretraining: data, training, evaluation, benchmarks.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True
    pipeline_cli.register(sub)
    train_cli.register(sub)
    bench.register(sub, loader=pipeline_cli.add_bench_loader_args, kernels=kernels_cli.add_bench_kernels_args)
    demo.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        sys.stderr.write(f"mveb {args.command}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"mveb {args.command}: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
