"""`qkvlab` command line: one subcommand per module of this package.

Each command module defines `register(subparsers)`, which adds its parser and sets
`func(args) -> int`. User errors (`QkvlabError`) and operating-system errors (a missing file,
a full disk) print one line and exit with code 2. SIGTERM and SIGHUP unwind like Ctrl-C, so
temporary files and directories are removed before the process ends.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
from importlib import metadata
from typing import NoReturn

from qkvlab.atomic import write_error
from qkvlab.errors import QkvlabError

COMMANDS = ("variants", "cost", "cache", "generate", "convert", "export", "eval", "analyze", "data", "train", "sweep",
            "report", "reproduce", "experiment", "bench")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse already exits 2; keep it to one line
        self.exit(2, f"{self.prog}: error: {message}\n")


def version() -> str:
    try:
        return metadata.version("qkvlab")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; given a known `command`, only that command's module is imported (`cost` and
    `cache` then answer without importing PyTorch)."""
    parser = _Parser(prog="qkvlab", description="Projection-sharing attention: variants, costs, training, the study.")
    parser.add_argument("--version", action="version", version=f"qkvlab {version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in (command,) if command in COMMANDS else COMMANDS:
        importlib.import_module(f"qkvlab.cli.{name}").register(sub)
    return parser


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def _signals_unwind():
    """SIGTERM/SIGHUP raise KeyboardInterrupt while a command runs (main thread only)."""
    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, _interrupt)
    except (ValueError, AttributeError):  # not the main thread, or no such signal here
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def os_error_message(err: OSError) -> str:
    """One line for an OSError that escaped a command (writes are reported by `qkvlab.atomic`)."""
    if err.filename is not None and err.errno is not None:
        if isinstance(err, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
            return f"{err.filename}: {err.strerror}"
        return str(write_error(err.filename, err))
    return err.strerror or str(err) or type(err).__name__


def _fail(message: str) -> int:
    print("qkvlab: error: " + " ".join(message.strip().splitlines()), file=sys.stderr)  # always one line
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    try:
        with _signals_unwind():
            return int(args.func(args) or 0)
    except QkvlabError as err:
        return _fail(str(err))
    except OSError as err:
        return _fail(os_error_message(err))
    except KeyboardInterrupt:
        print("qkvlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
