"""The ``llama4serve`` command line: one subcommand per task (checkpoint, generate, bench, serve)."""

from __future__ import annotations

import argparse
import sys

from llama4serve.cluster.cli.bench import add_bench_subcommand
from llama4serve.cluster.checkpoints.maker import add_checkpoint_subcommand
from llama4serve.cluster.cli.generate_cmd import add_generate_subcommand
from llama4serve.cluster.cli.serve_cmd import add_serve_subcommand


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each subcommand sets ``func(args) -> int``."""
    parser = argparse.ArgumentParser(prog="llama4serve", description="Ray-based serving of Llama 4")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_checkpoint_subcommand(subparsers)
    add_generate_subcommand(subparsers)
    add_bench_subcommand(subparsers)
    add_serve_subcommand(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the chosen subcommand; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
