"""Tiny tasks for the trainer's tests, independent of the real tasks and models.

Importable as "toy_task:ToyTask" when this directory is on PYTHONPATH (subprocess tests).
The model is an embedding, a token-mixing layer, a LayerNorm, dropout and a tied output head:
it has every parameter kind the optimizer groups and a tied weight the checkpoint must dedupe.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from qkvlab.models.config import ModelConfig
from qkvlab.tasks.base import Budget, Task

VOCAB, SEQ = 16, 8


class ToyNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.max_seq_len, d))
        self.mix = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight
        nn.init.normal_(self.tok_emb.weight, std=0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok_emb(x) + self.pos_emb[:, : x.shape[1]]  # (B, T, d)
        h = h + self.drop(F.gelu(self.mix(h)))  # (B, T, d)
        return self.head(self.norm(h))  # (B, T, V)


class ToyTask(Task):
    """Map each symbol x to (x + 1) mod 16; accuracy per symbol."""

    name = "toy"
    family = "synthetic"
    metric = "accuracy"
    higher_is_better = True
    budgets = {"tiny": Budget(steps=24, batch_size=8, lr=3e-2, eval_every=8, warmup_steps=2, eval_batches=2),
               "quick": Budget(steps=40, batch_size=16, lr=3e-2, eval_every=20, warmup_steps=4, eval_batches=2)}

    def model_config(self, variant: str, preset: str = "quick") -> ModelConfig:
        return ModelConfig(kind="encoder", variant=variant, n_layers=1, d_model=16, n_heads=2, max_seq_len=SEQ,
                           vocab_size=VOCAB, dropout=0.1)

    def build_model(self, cfg: ModelConfig) -> nn.Module:
        return ToyNet(cfg)

    def _batch(self, generator: torch.Generator, batch_size: int) -> dict:
        x = torch.randint(0, VOCAB, (batch_size, SEQ), generator=generator)  # (B, T)
        return {"x": x, "y": (x + 1) % VOCAB}

    def train_batch(self, step: int, batch_size: int, seed: int) -> dict:
        return self._batch(torch.Generator().manual_seed(seed * 1_000_003 + step), batch_size)

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        logits = model(batch["x"])  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten())

    def evaluate(self, model: nn.Module, batch_size: int, max_batches: int | None = None) -> dict:
        g = torch.Generator().manual_seed(12345)
        losses, correct, total = [], 0, 0
        for _ in range(max_batches or 2):
            batch = self._batch(g, batch_size)
            logits = model(batch["x"])
            losses.append(F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten()).item())
            correct += (logits.argmax(-1) == batch["y"]).sum().item()
            total += batch["y"].numel()
        return {"accuracy": correct / total, "loss": sum(losses) / len(losses)}


class SlowToyTask(ToyTask):
    """ToyTask whose batches take a while, so a test can kill a run mid-training."""

    def train_batch(self, step: int, batch_size: int, seed: int) -> dict:
        time.sleep(0.05)
        return super().train_batch(step, batch_size, seed)


class NanToyTask(ToyTask):
    """ToyTask whose loss becomes NaN from step NAN_STEP on."""

    NAN_STEP = 7

    def train_batch(self, step: int, batch_size: int, seed: int) -> dict:
        batch = super().train_batch(step, batch_size, seed)
        batch["scale"] = torch.full((batch_size,), float("nan") if step >= self.NAN_STEP else 1.0)
        return batch

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return super().loss(model, batch) * batch["scale"].mean()


class CrashingToyTask(ToyTask):
    """ToyTask whose process dies at its third step (as under the out-of-memory killer): no Python cleanup."""

    def train_batch(self, step: int, batch_size: int, seed: int) -> dict:
        if step == 2:
            os._exit(9)
        return super().train_batch(step, batch_size, seed)
