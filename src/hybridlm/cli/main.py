"""The `hybridlm` command line: one module per command, each with a `register(subparsers)` function.

A command module adds its parser to `subparsers` and sets `func` (a callable taking the parsed
arguments and returning an exit code). Heavy imports belong inside `func`, so `hybridlm --help`
stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = [
    "hybridlm.cli.info",
    "hybridlm.cli.train",
    "hybridlm.cli.export",
    "hybridlm.cli.data",
    "hybridlm.cli.tokenizer",
    "hybridlm.cli.fit",
    "hybridlm.cli.ladder",
    "hybridlm.cli.generate",
    "hybridlm.cli.tasks",
    "hybridlm.cli.theory",
    "hybridlm.cli.eval",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridlm",
        description="Hybrid Gated DeltaNet / attention language models (Olmo Hybrid).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
