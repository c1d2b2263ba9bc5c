"""Fixtures for the cost tests."""

from __future__ import annotations

import pytest
import torch

from cost_helpers import all_commands_exist, local_main


@pytest.fixture
def cli(capsys):
    """run(*argv) -> (exit code, stdout, stderr) through `qkvlab.cli.main.main` (or `local_main`)."""
    entry = None

    def run(*argv: str) -> tuple[int, str, str]:
        nonlocal entry
        if entry is None:
            from qkvlab.cli.main import main

            entry = main if all_commands_exist() else local_main
        capsys.readouterr()
        try:
            code = entry(list(argv))
        except SystemExit as exc:  # argparse errors
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: one intra-op thread is faster and immune to a busy machine's contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
