"""`mveb`: one console script; each subcommand is a thin parser over a function tests call directly.

Subcommands register themselves from the package that owns them, so the argument surface
lives beside the code it drives.
"""

from __future__ import annotations

import argparse
import sys

from mveb.errors import UsageError


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad option as one line and exit code 2, no usage dump; and that
    takes key=value overrides between flags too (`--epochs 3 a=1 --out x b=2`), where argparse
    gives a nargs="*" positional only its first run of words and calls the rest unrecognized."""

    def parse_args(self, args: list[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            others = [x for x in extra if x.startswith("-") or "=" not in x]
            if others or not isinstance(getattr(parsed, "overrides", None), list):
                self.error(f"unrecognized arguments: {' '.join(others or extra)}")
            parsed.overrides += extra
        return parsed

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
