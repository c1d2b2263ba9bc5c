"""Shared fixtures: fetched datasets (skipped only outside CI when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qkvlab.data.cache import dataset_dir, is_ready


@pytest.fixture
def fetched():
    """`fetched(name)` -> the dataset's cache dir; skips if absent (fails in CI, which fetches `test`)."""
    def need(name: str) -> Path:
        if not is_ready(name):
            message = f"dataset {name!r} is not fetched; run: qkvlab data fetch test"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        return dataset_dir(name)
    return need
