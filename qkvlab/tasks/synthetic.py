"""Synthetic sequence tasks: a bidirectional encoder labels every position of a list of digits.

The paper's five (vocabulary 10, lengths 64-256): reverse, sort, copy, swap (the two halves
trade places), substitute (x -> 9 - x). Beyond the paper, associative recall: key-value pairs,
a separator and a query key; only the last position is labelled, with the query key's value.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qkvlab.errors import QkvlabError
from qkvlab.models.config import ModelConfig
from qkvlab.tasks.base import Batch, Budget, Task
from qkvlab.tasks.common import FixedEvalSet, device_of, eval_counts, evaluating, rng

VOCAB = 10
IGNORE = -100  # label of positions without a target


def _swap(x: np.ndarray) -> np.ndarray:
    half = x.shape[1] // 2
    return np.concatenate([x[:, half:], x[:, :half]], axis=1)


RULES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "reverse": lambda x: x[:, ::-1],
    "sort": lambda x: np.sort(x, axis=1),
    "copy": lambda x: x,
    "swap": _swap,
    "substitute": lambda x: VOCAB - 1 - x,
}
TASKS = (*RULES, "recall")


def recall_vocab(length: int) -> int:
    """Token ids of recall: values 0-9, keys 10..10+P-1, then the separator (P = (length - 2) // 2)."""
    return VOCAB + (length - 2) // 2 + 1


def generate(kind: str, n: int, length: int, gen: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`n` examples of task `kind`: inputs (n, length) and labels (n, length), int64."""
    if kind in RULES:
        x = gen.integers(0, VOCAB, size=(n, length))  # (n, L)
        return x, np.ascontiguousarray(RULES[kind](x))
    if kind != "recall":
        raise QkvlabError(f"unknown synthetic task {kind!r}; accepted: {', '.join(TASKS)}")
    pairs = (length - 2) // 2
    keys = VOCAB + np.argsort(gen.random((n, pairs)), axis=1)  # (n, P) distinct keys per row
    values = gen.integers(0, VOCAB, size=(n, pairs))  # (n, P)
    which = gen.integers(0, pairs, size=n)  # (n,) the queried pair
    x = np.full((n, length), VOCAB + pairs, dtype=np.int64)  # separator fills the tail
    x[:, 0:2 * pairs:2], x[:, 1:2 * pairs:2] = keys, values
    x[:, -1] = keys[np.arange(n), which]
    y = np.full((n, length), IGNORE, dtype=np.int64)
    y[:, -1] = values[np.arange(n), which]
    return x, y


class SyntheticTask(Task):
    """One synthetic task at one sequence length."""

    family = "synthetic"
    metric = "accuracy"
    higher_is_better = True
    causal = False
    budgets = {
        "tiny": Budget(steps=30, batch_size=32, lr=3e-3, eval_every=30, eval_batches=2),
        "quick": Budget(steps=300, batch_size=64, lr=3e-3, eval_every=100, warmup_steps=30),
        "full": Budget(steps=10_000, batch_size=128, lr=1e-3, eval_every=1000, warmup_steps=500),
    }
    sizes = {"tiny": (1, 32, 4), "quick": (2, 64, 4), "full": (4, 128, 8)}  # layers, d_model, heads
    eval_examples = 4096  # sequences drawn once from EVAL_SEED

    def __init__(self, kind: str, length: int = 64, name: str | None = None) -> None:
        if kind not in TASKS:
            raise QkvlabError(f"unknown synthetic task {kind!r}; accepted: {', '.join(TASKS)}")
        if not 4 <= length <= 4096 or (kind == "swap" and length % 2):
            raise QkvlabError(f"length {length} is not accepted for {kind}: use 4..4096 (even for swap)")
        self.kind, self.length = kind, length
        self.name = name or f"{kind}-{length}"
        self.vocab_size = recall_vocab(length) if kind == "recall" else VOCAB
        self.held_out = FixedEvalSet(self.eval_examples, self._batch)

    def model_config(self, variant: str, preset: str = "quick") -> ModelConfig:
        layers, d_model, heads = self.sizes.get(preset, self.sizes["quick"])
        return ModelConfig(kind="encoder", variant=variant, n_layers=layers, d_model=d_model, n_heads=heads,
                           activation="gelu", max_seq_len=self.length, vocab_size=self.vocab_size, n_classes=VOCAB,
                           positions="learned")

    def _batch(self, n: int, gen: np.random.Generator) -> Batch:
        x, y = generate(self.kind, n, self.length, gen)
        return {"inputs": torch.from_numpy(x), "labels": torch.from_numpy(y)}  # (B, L), (B, L)

    def train_batch(self, step: int, batch_size: int, seed: int) -> Batch:
        return self._batch(batch_size, rng(seed, step))

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        device = device_of(model)
        logits = model(batch["inputs"].to(device))  # (B, L, 10)
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].to(device).flatten(), ignore_index=IGNORE)

    def evaluate(self, model: nn.Module, batch_size: int, max_batches: int | None = None) -> dict[str, float]:
        device = device_of(model)
        loss_sum = correct = labelled = seq_correct = rows = 0.0
        with evaluating(model):
            for batch in self.held_out.batches(batch_size, max_batches):
                x, y = batch["inputs"].to(device), batch["labels"].to(device)
                logits = model(x)  # (B, L, 10)
                mask = y != IGNORE  # (B, L)
                loss_sum += F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                                            reduction="sum").item()
                hit = (logits.argmax(-1) == y) | ~mask  # (B, L)
                correct += (hit & mask).sum().item()
                labelled += mask.sum().item()
                seq_correct += hit.all(dim=1).sum().item()
                rows += len(y)
        return {"accuracy": correct / labelled, "sequence_accuracy": seq_correct / rows,
                "loss": loss_sum / labelled, **eval_counts(int(rows), self.eval_examples)}
