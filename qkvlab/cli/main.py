"""`qkvlab` command line: one subcommand per module of this package.

Each command module defines `register(subparsers)`, which adds its parser and sets
`func(args) -> int`. User errors (`QkvlabError`) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from qkvlab.errors import QkvlabError

COMMANDS = ("variants", "cost", "cache", "generate", "convert", "analyze", "data", "train", "sweep", "report", "reproduce")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse already exits 2; keep it to one line
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; given a known `command`, only that command's module is imported (`cost` and
    `cache` then answer without importing PyTorch)."""
    parser = _Parser(prog="qkvlab", description="Projection-sharing attention: variants, costs, training, the study.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in (command,) if command in COMMANDS else COMMANDS:
        importlib.import_module(f"qkvlab.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except QkvlabError as err:
        print(f"qkvlab: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qkvlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
