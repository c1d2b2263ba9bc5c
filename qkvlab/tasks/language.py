"""Language modelling on a token directory: GPT-2 style decoder, validation perplexity.

The context is the model's `max_seq_len` once `setup` has run (until then the constructor's
`context`, else the quick preset's). Training windows of `context + 1` tokens start at uniform
random positions of the train split (seeded by (seed, step)); evaluation reads consecutive
non-overlapping windows of the val split. When the directory records how many characters a
split encodes, bits per character and per-character perplexity are reported too.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qkvlab.data.tokens import TokenDir, open_tokens
from qkvlab.errors import QkvlabError
from qkvlab.models.config import ModelConfig
from qkvlab.tasks.base import Batch, Budget, Task
from qkvlab.tasks.common import device_of, eval_counts, evaluating, rng


def padded_vocab(vocab_size: int, multiple: int = 64) -> int:
    """The embedding size: the vocabulary rounded up (GPT-2's 50,257 -> 50,304)."""
    return -(-vocab_size // multiple) * multiple


class LanguageModelTask(Task):
    """Next-token prediction on the token directory `path()` returns (opened on first use)."""

    family = "lm"
    metric = "perplexity"
    higher_is_better = False
    causal = True
    budgets = {
        "tiny": Budget(steps=30, batch_size=16, lr=3e-3, eval_every=30, eval_batches=2),
        # quick: one evaluation, on the whole val split, at the end
        "quick": Budget(steps=800, batch_size=32, lr=1e-2, eval_every=0, warmup_steps=80),
        "full": Budget(steps=20_000, batch_size=64, lr=6e-4, eval_every=1000, warmup_steps=1000),
    }
    # layers, d_model, heads, context; 8 and 16 heads so GQA-4 and MQA divide them
    sizes = {"tiny": (1, 32, 8, 32), "quick": (2, 128, 8, 64), "full": (8, 512, 16, 512)}

    def __init__(self, name: str, path: Callable[[], str | os.PathLike], vocab_size: int | None = None,
                 context: int | None = None, val_split: str = "val", budgets: dict[str, Budget] | None = None,
                 sizes: dict[str, tuple[int, int, int, int]] | None = None) -> None:
        """`budgets` and `sizes` replace the class's for the presets they name (a corpus's own recipe)."""
        self.name, self._path, self._vocab_size = name, path, vocab_size
        if budgets:
            self.budgets = {**type(self).budgets, **budgets}
        if sizes:
            self.sizes = {**type(self).sizes, **sizes}
        self._explicit_context, self.val_split = context, val_split
        self.context = context or self.sizes["quick"][3]
        self._tokens: TokenDir | None = None

    @property
    def tokens(self) -> TokenDir:
        if self._tokens is None:
            self._tokens = open_tokens(Path(self._path()))
            if self._vocab_size is not None and self._tokens.vocab_size != self._vocab_size:
                raise QkvlabError(f"{self._tokens.path} has a vocabulary of {self._tokens.vocab_size}, "
                                  f"task {self.name!r} expects {self._vocab_size}")
        return self._tokens

    def tokenizer(self):
        """The token directory's tokenizer (None when it cannot be known); a run's saved models record it."""
        from qkvlab.data.tokenizer import token_dir_tokenizer

        return token_dir_tokenizer(self.tokens.path)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size if self._vocab_size is not None else self.tokens.vocab_size

    def model_config(self, variant: str, preset: str = "quick") -> ModelConfig:
        layers, d_model, heads, context = self.sizes.get(preset, self.sizes["quick"])
        context = self._explicit_context or context
        return ModelConfig(kind="decoder", variant=variant, n_layers=layers, d_model=d_model, n_heads=heads,
                           activation="gelu", max_seq_len=context, vocab_size=padded_vocab(self.vocab_size),
                           positions="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True)

    def setup(self, model: ModelConfig, preset: str) -> None:
        self.context = model.max_seq_len  # the windows train_batch and evaluate read

    def model_inputs(self, batch: Batch) -> torch.Tensor:
        return batch["tokens"][:, :-1]  # (B, T)

    def train_batch(self, step: int, batch_size: int, seed: int) -> Batch:
        windows = self.tokens.split("train").random_windows(batch_size, self.context + 1, rng(seed, step))
        return {"tokens": torch.from_numpy(windows)}  # (B, T+1)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        tokens = batch["tokens"].to(device_of(model))  # (B, T+1)
        return model(tokens[:, :-1], targets=tokens[:, 1:])  # the output layer and loss without the full logits

    def evaluate(self, model: nn.Module, batch_size: int, max_batches: int | None = None) -> dict[str, float]:
        split, device = self.tokens.split(self.val_split), device_of(model)
        limit = None if max_batches is None else max_batches * batch_size
        windows = split.sequential_windows(self.context + 1, limit)
        loss_sum = count = 0.0
        with evaluating(model):
            while chunk := list(itertools.islice(windows, batch_size)):
                tokens = torch.from_numpy(np.stack(chunk)).to(device)  # (B, T+1)
                logits = model(tokens[:, :-1])  # (B, T, V)
                loss_sum += F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum").item()
                count += tokens[:, 1:].numel()
        if not count:
            raise QkvlabError(f"the {self.val_split} split of {self.tokens.path} is shorter than one window")
        loss = loss_sum / count
        windows_total = sum(len(shard) // (self.context + 1) for shard in split.shards)
        metrics = {"perplexity": math.exp(min(loss, 50.0)), "loss": loss, "eval_tokens": int(count),
                   **eval_counts(int(count) // self.context, windows_total)}
        if split.chars:  # characters per token over the whole split, applied to the windows read
            per_char = loss * split.n_tokens / split.chars
            metrics["bits_per_char"] = per_char / math.log(2)
            metrics["char_perplexity"] = math.exp(min(per_char, 50.0))
        return metrics
