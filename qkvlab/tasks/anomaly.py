"""Anomaly detection on MNIST and Fashion-MNIST.

Set anomaly: a set of N images, N - 1 of one class and 1 of another; an encoder without
positional encoding (so it sees a set, not a sequence) gives each element a logit, and the
softmax over the set picks the odd one. Metric: accuracy of that pick.

One-class: a ViT learns to inpaint masked patches of one class's images only; the
reconstruction error of held-out images (every patch masked once, in two checkerboard passes)
is the anomaly score, and AUROC measures how well it separates the other classes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qkvlab.data.images import ImageSet
from qkvlab.errors import QkvlabError
from qkvlab.models.config import ModelConfig
from qkvlab.tasks.base import Batch, Budget, Task
from qkvlab.tasks.common import (
    EVAL_SEED,
    EpochSampler,
    FixedEvalSet,
    device_of,
    eval_batches,
    eval_counts,
    evaluating,
    rng,
)
from qkvlab.tasks.vision import channel_stats, to_tensor


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count half."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise QkvlabError("AUROC needs both positive and negative examples")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.arange(1, len(scores) + 1)
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])  # tie groups
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends, strict=True):
        if e - s > 1:
            ranks[order[s:e]] = (s + 1 + e) / 2.0  # mean rank of the tie group
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class SetAnomalyTask(Task):
    """Find the odd image among `set_size` (one of another class); encoder on raw pixels."""

    family = "anomaly"
    metric = "accuracy"
    input_key = "sets"
    higher_is_better = True
    causal = False
    budgets = {
        "tiny": Budget(steps=20, batch_size=16, lr=2e-3, eval_every=20, eval_batches=2),
        "quick": Budget(steps=2000, batch_size=32, lr=4e-3, eval_every=500, warmup_steps=100),
        "full": Budget(steps=10_000, batch_size=64, lr=5e-4, eval_every=1000, warmup_steps=500),
    }
    sizes = {"tiny": (1, 32, 4), "quick": (2, 64, 4), "full": (4, 128, 8)}
    eval_examples = 4000  # sets drawn once from the test split

    def __init__(self, name: str, loader: Callable[[], ImageSet], set_size: int = 10) -> None:
        if set_size < 3:
            raise QkvlabError(f"set_size must be at least 3, got {set_size}")
        self.name, self._loader, self.set_size = name, loader, set_size
        self._data: ImageSet | None = None
        self.held_out = FixedEvalSet(self.eval_examples, lambda n, gen: self._batch("test", n, gen))

    @property
    def data(self) -> ImageSet:
        if self._data is None:
            self._data = self._loader()
            self._mean, self._std = channel_stats(self._data.train_images)
            self._by_class = {split: [np.flatnonzero(self._data.split(split)[1] == c)
                                      for c in range(self._data.n_classes)] for split in ("train", "test")}
        return self._data

    @property
    def input_dim(self) -> int:
        return 28 * 28

    def model_config(self, variant: str, preset: str = "quick") -> ModelConfig:
        layers, d_model, heads = self.sizes.get(preset, self.sizes["quick"])
        return ModelConfig(kind="encoder", variant=variant, n_layers=layers, d_model=d_model, n_heads=heads,
                           activation="gelu", input_dim=self.input_dim, n_classes=1, max_seq_len=self.set_size,
                           positions="none")

    def sets(self, split: str, n: int, gen: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """`n` sets: image indices (n, set_size) into `split` and the odd position (n,)."""
        data, by_class = self.data, self._by_class[split]
        n_classes = data.n_classes
        normal = gen.integers(0, n_classes, size=n)  # (n,)
        odd_class = (normal + gen.integers(1, n_classes, size=n)) % n_classes  # (n,) always another class
        odd_pos = gen.integers(0, self.set_size, size=n)  # (n,)
        order = np.concatenate(by_class)  # image indices grouped by class
        counts = np.array([len(pool) for pool in by_class])  # (C,)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])  # (C,)
        classes = np.repeat(normal[:, None], self.set_size, axis=1)  # (n, set_size)
        classes[np.arange(n), odd_pos] = odd_class
        picks = (gen.random((n, self.set_size)) * counts[classes]).astype(np.int64)  # (n, set_size)
        return order[starts[classes] + picks], odd_pos

    def _batch(self, split: str, n: int, gen: np.random.Generator) -> Batch:
        images = self.data.split(split)[0]
        index, odd = self.sets(split, n, gen)
        flat = np.sort(np.unique(index))
        pixels = to_tensor(images[flat], self._mean, self._std).flatten(1)  # (U, 784)
        where = torch.from_numpy(np.searchsorted(flat, index))  # (n, set_size)
        return {"sets": pixels[where], "odd": torch.from_numpy(odd)}  # (n, set_size, 784), (n,)

    def train_batch(self, step: int, batch_size: int, seed: int) -> Batch:
        return self._batch("train", batch_size, rng(seed, step))

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        device = device_of(model)
        logits = model(batch["sets"].to(device))[..., 0]  # (B, N)
        return F.cross_entropy(logits, batch["odd"].to(device))

    def evaluate(self, model: nn.Module, batch_size: int, max_batches: int | None = None) -> dict[str, float]:
        device = device_of(model)
        loss_sum = correct = count = 0.0
        with evaluating(model):
            for batch in self.held_out.batches(batch_size, max_batches):
                logits = model(batch["sets"].to(device))[..., 0]  # (B, N)
                odd = batch["odd"].to(device)
                loss_sum += F.cross_entropy(logits, odd, reduction="sum").item()
                correct += (logits.argmax(-1) == odd).sum().item()
                count += len(odd)
        return {"accuracy": correct / count, "loss": loss_sum / count,
                **eval_counts(int(count), self.eval_examples)}


class OneClassTask(Task):
    """Learn one class by masked-patch inpainting; score the others by reconstruction error."""

    family = "anomaly"
    metric = "auroc"
    input_key = "images"
    higher_is_better = True
    causal = False
    budgets = {
        "tiny": Budget(steps=20, batch_size=32, lr=2e-3, eval_every=20, eval_batches=4),
        "quick": Budget(steps=150, batch_size=64, lr=2e-3, eval_every=50, warmup_steps=15),
        "full": Budget(steps=5_000, batch_size=128, lr=5e-4, eval_every=500, warmup_steps=250),
    }
    sizes = {"tiny": (1, 32, 4), "quick": (2, 64, 4), "full": (4, 128, 8)}
    patch_size = 7
    mask_ratio = 0.5

    def __init__(self, name: str, loader: Callable[[], ImageSet], normal_class: int = 0, image_size: int = 28) -> None:
        self.name, self._loader, self.normal_class, self.image_size = name, loader, normal_class, image_size
        self._data: ImageSet | None = None

    @property
    def data(self) -> ImageSet:
        if self._data is None:
            data = self._loader()
            if not 0 <= self.normal_class < data.n_classes:
                raise QkvlabError(f"normal class {self.normal_class} is not in 0..{data.n_classes - 1}")
            if data.image_size != self.image_size or data.channels != 1:
                raise QkvlabError(f"{self.name} needs {self.image_size}x{self.image_size} grey images, "
                                  f"got {data.image_size}x{data.image_size}x{data.channels}")
            self._data = data
            self._normal = np.flatnonzero(data.train_labels == self.normal_class)
            self._mean, self._std = channel_stats(data.train_images[self._normal])
            self._sampler = EpochSampler(len(self._normal))
        return self._data

    def model_config(self, variant: str, preset: str = "quick") -> ModelConfig:
        layers, d_model, heads = self.sizes.get(preset, self.sizes["quick"])
        size = self.image_size
        return ModelConfig(kind="vit", variant=variant, n_layers=layers, d_model=d_model, n_heads=heads,
                           activation="gelu", image_size=size, patch_size=self.patch_size, in_channels=1, n_classes=1,
                           dense_head=True, max_seq_len=(size // self.patch_size) ** 2 + 1, positions="learned")

    def _patch_mask(self, grid_mask: torch.Tensor, size: int) -> torch.Tensor:
        """(B, g, g) bool patch mask -> (B, 1, H, W) float pixel mask."""
        pixels = grid_mask.repeat_interleave(self.patch_size, 1).repeat_interleave(self.patch_size, 2)
        return pixels[:, None, :size, :size].float()

    def train_batch(self, step: int, batch_size: int, seed: int) -> Batch:
        data = self.data
        idx = np.sort(self._normal[self._sampler.indices(step, batch_size, seed)])
        images = to_tensor(data.train_images[idx], self._mean, self._std)  # (B, 1, H, W)
        grid = data.image_size // self.patch_size
        scores = torch.from_numpy(rng(seed, step, 3).random((batch_size, grid * grid)))
        k = int(round(self.mask_ratio * grid * grid))
        chosen = scores.argsort(dim=1)[:, :k]  # (B, k) masked patches
        grid_mask = torch.zeros(batch_size, grid * grid, dtype=torch.bool).scatter_(1, chosen, True)
        return {"images": images, "mask": self._patch_mask(grid_mask.view(-1, grid, grid), data.image_size)}

    @staticmethod
    def _errors(model: nn.Module, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Squared reconstruction error per pixel, masked pixels only: (B, 1, H, W)."""
        recon = model(images * (1 - mask))  # (B, 1, H, W)
        return (recon - images).pow(2) * mask

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        device = device_of(model)
        mask = batch["mask"].to(device)
        return self._errors(model, batch["images"].to(device), mask).sum() / mask.sum().clamp(min=1)

    def anomaly_scores(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Mean inpainting error with every patch masked once (two checkerboards): (B,)."""
        grid = self.data.image_size // self.patch_size
        board = (torch.arange(grid)[:, None] + torch.arange(grid)[None, :]) % 2 == 0  # (g, g)
        total = torch.zeros(len(images), device=images.device)
        for grid_mask in (board, ~board):
            mask = self._patch_mask(grid_mask.expand(len(images), -1, -1), self.data.image_size).to(images.device)
            total += self._errors(model, images, mask).flatten(1).sum(1)
        return total / images[0].numel()

    def evaluate(self, model: nn.Module, batch_size: int, max_batches: int | None = None) -> dict[str, float]:
        data, device = self.data, device_of(model)
        n = len(data.test_images)
        order = rng(EVAL_SEED, 0).permutation(n)  # a class-balanced prefix however many batches run
        scores, labels = [], []
        with evaluating(model):
            for chunk in eval_batches(n, batch_size, max_batches):
                idx = np.sort(order[chunk])
                images = to_tensor(data.test_images[idx], self._mean, self._std).to(device)
                scores.append(self.anomaly_scores(model, images).cpu().numpy())
                labels.append(data.test_labels[idx] != self.normal_class)
        scores_np, anomalous = np.concatenate(scores), np.concatenate(labels)
        normal_loss = float(scores_np[~anomalous].mean()) if (~anomalous).any() else float("nan")
        return {"auroc": auroc(scores_np, anomalous), "loss": normal_loss, **eval_counts(len(scores_np), n)}
