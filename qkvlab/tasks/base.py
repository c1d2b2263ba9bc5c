"""What every task of the study provides to the trainer, the sweep and the report.

Batches are a pure function of (seed, step): resuming and distributed training need no
sampler state. The trainer asks for the *global* batch of a step and each rank takes its
rows, so N processes see exactly the batch one process would.

A task's life: `model_config(variant, preset)` describes the model it would train (a pure
function), run resolution (`qkvlab.train.config.resolve_run`) settles the model actually trained
(the task's, a preset, saved weights, with overrides) and calls `setup(model, preset)` once;
then `train_batch`, `loss` and `evaluate`. A task that was never set up behaves as for the
"quick" preset and its own model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from qkvlab.models.config import ModelConfig

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Budget:
    """How long one run of a task trains in a `qkvlab reproduce` preset."""

    steps: int
    batch_size: int
    lr: float
    eval_every: int
    warmup_steps: int = 0
    eval_batches: int | None = None  # None: the whole held-out split (or the task's fixed evaluation set)


class Task(ABC):
    """A trainable task: its data, its model family, its loss and its metrics."""

    name: str = ""
    family: str = ""  # "synthetic" | "vision" | "anomaly" | "segmentation" | "lm"
    metric: str = ""  # the headline metric evaluate() returns, e.g. "accuracy", "perplexity"
    higher_is_better: bool = True
    causal: bool = False  # decoder tasks: the "+" variants and Q=K ties behave differently
    budgets: dict[str, Budget] = {}

    @abstractmethod
    def model_config(self, variant: str, preset: str = "quick") -> ModelConfig:
        """The model this task trains for `variant` at a reproduce preset ("quick", "full", "tiny").

        Pure: it changes nothing in the task (`setup` does)."""

    def setup(self, model: ModelConfig, preset: str) -> None:  # noqa: B027 (an optional hook, empty by default)
        """Prepare the data for training `model` at `preset`, before the first batch.

        Called once, by run resolution. The default does nothing; a task whose data depends on the
        model or the preset sets that here (a language model reads windows of the model's
        `max_seq_len`; image augmentation is for long schedules only)."""

    @abstractmethod
    def train_batch(self, step: int, batch_size: int, seed: int) -> Batch:
        """The global training batch of `step` (deterministic in seed and step, on CPU)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean training loss of `model` on `batch` (a scalar tensor)."""

    @abstractmethod
    def evaluate(self, model: nn.Module, batch_size: int, max_batches: int | None = None) -> dict[str, float]:
        """Metrics on held-out data, including `self.metric` and "loss"."""

    input_key: str = "inputs"  # the batch entry the model reads (analysis tools feed it to the model)

    def model_inputs(self, batch: Batch) -> torch.Tensor:
        """What the model is called with for `batch` (e.g. by `qkvlab analyze`)."""
        return batch[self.input_key]

    def budget(self, preset: str) -> Budget:
        if preset not in self.budgets:
            from qkvlab.errors import QkvlabError
            raise QkvlabError(f"task {self.name!r} has no budget for preset {preset!r}; "
                              f"accepted: {', '.join(self.budgets)}")
        return self.budgets[preset]
