"""Every task trains a tiny model: a few AdamW steps on one batch lower its loss, and evaluate()
returns the task's metric and a loss with the model back in train mode."""

from __future__ import annotations

import math

import pytest
import torch

from qkvlab.data.samples import write_cifar, write_tinyimagenet
from qkvlab.data.text import build_stdlib, stdlib_files
from qkvlab.data.tokenize import tokenize_files
from qkvlab.data.tokenizer import gpt2_tokenizer
from qkvlab.models import build_model
from qkvlab.tasks.registry import get_task

# task, variant, dataset it reads (None: generated)
CASES = [
    ("reverse-16", "QKV", None), ("sort-16", "Q=K=V+", None), ("copy-16", "Q=X", None),
    ("swap-16", "Q-K=V", None), ("substitute-16", "Q=K-V", None), ("recall-16", "Q=K-V+", None),
    ("mnist", "Q-K=V", "mnist"), ("fashion-mnist", "Q=K-V+", "fashion-mnist"),
    ("set-anomaly", "QKV", "mnist"), ("set-anomaly-fashion", "Q=K=V", "fashion-mnist"),
    ("oneclass-mnist", "Q-K=V", "mnist"), ("oneclass-fashion", "QKV", "fashion-mnist"),
    ("segmentation", "Q=K=V+", "mnist"),
    ("shakespeare-char", "Q-MQA", "shakespeare"), ("ptb-word", "GQA-4", "ptb"),
]


def _train(task, variant: str, batch_size: int = 8, steps: int = 12) -> tuple[float, float]:
    torch.manual_seed(0)
    config = task.model_config(variant, "tiny")
    task.setup(config, "tiny")
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = task.train_batch(0, batch_size, seed=0)
    with torch.no_grad():
        before = task.loss(model, batch).item()
    for _ in range(steps):
        loss = task.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = task.loss(model, batch).item()
    metrics = task.evaluate(model, batch_size=batch_size, max_batches=2)
    assert model.training
    assert task.metric in metrics and "loss" in metrics
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    return before, after


@pytest.mark.parametrize("name,variant,dataset", CASES, ids=[c[0] for c in CASES])
def test_task_trains(fetched, name, variant, dataset):
    if dataset:
        fetched(dataset)
    task = get_task(name)
    batch_size = 32 if name.startswith("oneclass") else 8  # AUROC needs normal and anomalous images
    before, after = _train(task, variant, batch_size)
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_tasks_train_on_generated_batches(tmp_path, name):
    write_cifar(tmp_path, name, per_batch=8)
    before, after = _train(get_task(name, data_dir=str(tmp_path)), "Q=K=V+")
    assert after < 0.9 * before


def test_tinyimagenet_task_trains_on_generated_jpegs(tmp_path, monkeypatch):
    monkeypatch.setenv("QKVLAB_DATA", str(tmp_path / "cache"))
    write_tinyimagenet(tmp_path / "user", n_classes=4, per_class=3, n_val=4)
    task = get_task("tinyimagenet", data_dir=str(tmp_path / "user"))
    task.n_classes = 4  # the generated copy has 4 of the 200 classes
    before, after = _train(task, "Q-K=V", batch_size=4)
    assert after < 0.9 * before


@pytest.mark.slow
def test_token_directory_tasks_train(fetched, tmp_path):
    """The user-format path: stdlib BPE tokens, and GPT-2 tokens made by the converter."""
    build_stdlib(stdlib_files()[:30], tmp_path / "stdlib", vocab_size=512)
    before, after = _train(get_task("tokens", data_dir=str(tmp_path / "stdlib")), "Q-GQA-4")
    assert after < 0.9 * before
    fetched("gpt2")
    (tmp_path / "a.txt").write_text("To be, or not to be, that is the question. " * 40)
    tokenize_files([tmp_path / "a.txt"], gpt2_tokenizer(), tmp_path / "gpt2", val_files=[tmp_path / "a.txt"])
    before, after = _train(get_task("tokens", data_dir=str(tmp_path / "gpt2")), "Q-K=V")
    assert after < 0.9 * before
