"""Fixtures for the cost tests."""

from __future__ import annotations

import pytest

from qkvlab.cli.main import main


@pytest.fixture
def cli(capsys):
    """run(*argv) -> (exit code, stdout, stderr) through `qkvlab.cli.main.main`."""

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse errors
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    return run
