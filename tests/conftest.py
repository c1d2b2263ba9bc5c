"""Shared fixtures: one torch thread per test, and fetched datasets (skipped only outside CI when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton (where installed) runs its kernels through its interpreter, so tests/core/test_triton_read.py can run the
# CUDA cache read on CPU tensors: triton reads this as it is imported, which torch may do at any point.
os.environ.setdefault("TRITON_INTERPRET", "1")

from qkvlab.data.cache import dataset_dir, is_ready  # noqa: E402


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


@pytest.fixture(autouse=True)
def _one_thread():
    """The models in tests are tiny: one intra-op thread is faster than two fighting on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
