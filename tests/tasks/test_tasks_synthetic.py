"""Synthetic tasks: each label rule, determinism in (seed, step), and the metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qkvlab.errors import QkvlabError
from qkvlab.tasks.synthetic import IGNORE, RULES, TASKS, VOCAB, SyntheticTask, generate, recall_vocab


def test_label_rules():
    gen = np.random.default_rng(0)
    length = 12
    for kind in RULES:
        x, y = generate(kind, 50, length, gen)
        assert x.shape == y.shape == (50, length) and x.min() >= 0 and x.max() < VOCAB
        for row_x, row_y in zip(x, y, strict=True):
            for i in range(length):
                expected = {"reverse": row_x[length - 1 - i], "sort": sorted(row_x)[i], "copy": row_x[i],
                            "swap": row_x[(i + length // 2) % length], "substitute": 9 - row_x[i]}[kind]
                assert row_y[i] == expected, (kind, i)


def test_recall_answers_the_queried_key():
    length = 20
    x, y = generate("recall", 100, length, np.random.default_rng(1))
    pairs = (length - 2) // 2
    assert x.max() < recall_vocab(length) and (x[:, 2 * pairs] == VOCAB + pairs).all()  # the separator
    for row_x, row_y in zip(x, y, strict=True):
        keys, values = row_x[0:2 * pairs:2], row_x[1:2 * pairs:2]
        assert len(set(keys.tolist())) == pairs and keys.min() >= VOCAB and values.max() < VOCAB
        query = row_x[-1]
        assert row_y[-1] == values[keys.tolist().index(query)]
        assert (row_y[:-1] == IGNORE).all()


def test_batches_are_a_function_of_seed_and_step():
    task = SyntheticTask("sort", 16)
    a, b = task.train_batch(5, 8, seed=1), task.train_batch(5, 8, seed=1)
    assert torch.equal(a["inputs"], b["inputs"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["inputs"], task.train_batch(6, 8, seed=1)["inputs"])
    assert not torch.equal(a["inputs"], task.train_batch(5, 8, seed=2)["inputs"])
    assert a["inputs"].dtype == torch.int64 and a["inputs"].shape == (8, 16)


class Oracle(nn.Module):
    """Answers every position right except position 0 of odd rows."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        y = torch.from_numpy(np.ascontiguousarray(RULES[self.kind](x.numpy())))
        y[1::2, 0] = (y[1::2, 0] + 1) % VOCAB
        return F.one_hot(y, VOCAB).float() * 20 + self.dummy


def test_per_position_and_sequence_accuracy():
    task = SyntheticTask("reverse", 10)
    model = Oracle("reverse").train()
    metrics = task.evaluate(model, batch_size=8, max_batches=2)
    assert metrics["accuracy"] == pytest.approx(1 - 8 / 160)  # one wrong position in half the rows
    assert metrics["sequence_accuracy"] == pytest.approx(0.5)
    assert metrics["loss"] > 0 and model.training  # train mode restored


def test_bad_names_and_lengths():
    with pytest.raises(QkvlabError, match="accepted: reverse, sort, copy, swap, substitute, recall"):
        SyntheticTask("rotate")
    with pytest.raises(QkvlabError, match="even for swap"):
        SyntheticTask("swap", 15)
    assert set(TASKS) == {*RULES, "recall"}
