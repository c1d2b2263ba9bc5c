"""Helpers every task shares: seeded RNGs, evaluation mode, epoch sampling, budgets by preset."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

EVAL_SEED = 1_000_003  # held-out batches are the same for every run and seed


def rng(*keys: int) -> np.random.Generator:
    """A numpy generator determined by integer keys, e.g. rng(seed, step)."""
    return np.random.default_rng([int(k) for k in keys])


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """`model.eval()` and `torch.no_grad()`, restoring the previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


class EpochSampler:
    """Indices of a step's batch: each epoch a permutation from (seed, epoch); step indexes into it."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _perm(self, seed: int, epoch: int) -> np.ndarray:
        key = (seed, epoch)
        if key not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[key] = rng(seed, epoch, 7).permutation(self.n)
        return self._perms[key]

    def indices(self, step: int, batch_size: int, seed: int) -> np.ndarray:
        flat = step * batch_size + np.arange(batch_size)  # (B,) positions in the endless stream
        epochs, offsets = np.divmod(flat, self.n)
        return np.array([self._perm(seed, int(e))[o] for e, o in zip(epochs, offsets, strict=True)], dtype=np.int64)


def eval_batches(n: int, batch_size: int, max_batches: int | None) -> Iterator[np.ndarray]:
    """Consecutive index ranges over `n` held-out items, at most `max_batches` of them."""
    count = 0
    for start in range(0, n, batch_size):
        if max_batches is not None and count >= max_batches:
            return
        yield np.arange(start, min(start + batch_size, n))
        count += 1


class FixedEvalSet:
    """The held-out set of a generated task: `size` examples drawn once from `EVAL_SEED`.

    Every run, variant and seed evaluates on the same examples, whatever its batch size.
    `build(n, gen)` returns a batch (a dict of tensors with `n` rows).
    """

    def __init__(self, size: int, build) -> None:
        self.size, self._build = size, build
        self._batch: dict[str, torch.Tensor] | None = None

    def batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        if self._batch is None:
            self._batch = self._build(self.size, rng(EVAL_SEED))
        for idx in eval_batches(self.size, batch_size, max_batches):
            yield {key: value[idx[0]: idx[-1] + 1] for key, value in self._batch.items()}


def eval_counts(count: int, total: int) -> dict[str, float]:
    """How much of the held-out set an evaluation used (the report prints it)."""
    return {"eval_examples": count, "eval_fraction": count / total if total else 0.0}
