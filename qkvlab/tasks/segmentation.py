"""Segmentation: MNIST digits composited on a larger canvas, one label per pixel.

Each canvas holds `n_digits` digits at random offsets; the canvas is the pixel-wise maximum of
the digits. A pixel is labelled with the class of the digit that is brightest there when that
brightness reaches `threshold`, and background (class 10) otherwise. A ViT with a dense head
predicts the 11 classes per pixel; the metric is mean IoU over the classes present.
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
from qkvlab.models.vit import patch_order
from qkvlab.tasks.base import Batch, Budget, Task
from qkvlab.tasks.common import FixedEvalSet, device_of, eval_counts, evaluating, rng

BACKGROUND = 10
N_CLASSES = 11


def composite(digits: np.ndarray, classes: np.ndarray, canvas: int, gen: np.random.Generator,
              threshold: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Place digits (B, D, h, w) uint8 of `classes` (B, D) at random offsets on canvases.

    Returns the canvases (B, canvas, canvas) uint8, the labels (B, canvas, canvas) int64 and
    the offsets (B, D, 2) as (row, column).
    """
    B, D, h, w = digits.shape
    if canvas < max(h, w):
        raise QkvlabError(f"canvas {canvas} is smaller than a {h}x{w} digit")
    offsets = gen.integers(0, canvas - max(h, w) + 1, size=(B, D, 2))  # (B, D, 2)
    layers = np.zeros((B, D, canvas, canvas), dtype=np.uint8)
    rows = offsets[..., 0, None] + np.arange(h)  # (B, D, h)
    cols = offsets[..., 1, None] + np.arange(w)  # (B, D, w)
    b_idx, d_idx = np.arange(B)[:, None, None, None], np.arange(D)[None, :, None, None]
    layers[b_idx, d_idx, rows[..., :, None], cols[..., None, :]] = digits  # each digit at its offset
    image = layers.max(axis=1)  # (B, S, S)
    top = layers.argmax(axis=1)  # (B, S, S) which digit is brightest (the first on ties)
    labels = np.take_along_axis(classes[:, :, None, None], top[:, None], axis=1)[:, 0]  # (B, S, S)
    labels = np.where(image >= threshold, labels, BACKGROUND).astype(np.int64)
    return image, labels, offsets


def mean_iou(confusion: np.ndarray) -> float:
    """Mean intersection over union of the classes that occur (in labels or predictions)."""
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    return float((tp[present] / union[present]).mean())


class SegmentationTask(Task):
    """Per-pixel digit classes on `canvas`x`canvas` composites of `n_digits` MNIST digits."""

    family = "segmentation"
    metric = "miou"
    input_key = "images"
    higher_is_better = True
    causal = False
    budgets = {
        "tiny": Budget(steps=20, batch_size=16, lr=2e-3, eval_every=20, eval_batches=2),
        "quick": Budget(steps=2700, batch_size=32, lr=1e-2, eval_every=675, warmup_steps=100),
        "full": Budget(steps=20_000, batch_size=64, lr=5e-4, eval_every=1000, warmup_steps=1000),
    }
    sizes = {"tiny": (1, 32, 4), "quick": (2, 64, 4), "full": (6, 256, 8)}
    mean, std = 0.1307, 0.3081
    eval_examples = 1000  # canvases composed once from test digits  # MNIST pixel statistics on the 0-1 scale

    def __init__(self, name: str, loader: Callable[[], ImageSet], canvas: int = 56, n_digits: int = 3,
                 patch_size: int = 7) -> None:
        if canvas % patch_size:
            raise QkvlabError(f"patch_size {patch_size} does not divide the canvas {canvas}")
        self.name, self._loader = name, loader
        self.canvas, self.n_digits, self.patch_size = canvas, n_digits, patch_size
        self._data: ImageSet | None = None
        self.held_out = FixedEvalSet(self.eval_examples, lambda n, gen: self._batch("test", n, gen))

    @property
    def data(self) -> ImageSet:
        if self._data is None:
            self._data = self._loader()
        return self._data

    def model_config(self, variant: str, preset: str = "quick") -> ModelConfig:
        layers, d_model, heads = self.sizes.get(preset, self.sizes["quick"])
        return ModelConfig(kind="vit", variant=variant, n_layers=layers, d_model=d_model, n_heads=heads,
                           activation="gelu", image_size=self.canvas, patch_size=self.patch_size, in_channels=1,
                           n_classes=N_CLASSES, dense_head=True,
                           max_seq_len=(self.canvas // self.patch_size) ** 2 + 1, positions="learned")

    def _batch(self, split: str, n: int, gen: np.random.Generator) -> Batch:
        images, labels = self.data.split(split)
        pick = gen.integers(0, len(images), size=(n, self.n_digits))  # (B, D)
        flat = np.unique(pick)
        digits = np.asarray(images[flat])[np.searchsorted(flat, pick), ..., 0]  # (B, D, 28, 28)
        canvas, target, _ = composite(digits, labels[pick], self.canvas, gen)
        x = (torch.from_numpy(canvas).float()[:, None] / 255.0 - self.mean) / self.std  # (B, 1, S, S)
        return {"images": x, "labels": torch.from_numpy(target)}  # (B, 1, S, S), (B, S, S)

    def train_batch(self, step: int, batch_size: int, seed: int) -> Batch:
        return self._batch("train", batch_size, rng(seed, step))

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        device = device_of(model)
        logits = model(batch["images"].to(device), per_patch=True)  # (B, N, 11, p*p)
        labels = patch_order(batch["labels"].to(device), self.patch_size)  # (B, N, p*p)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(0, 1))  # mean over every pixel

    def evaluate(self, model: nn.Module, batch_size: int, max_batches: int | None = None) -> dict[str, float]:
        device = device_of(model)
        confusion = np.zeros((N_CLASSES, N_CLASSES), dtype=np.int64)
        loss_sum = pixels = 0.0
        count = 0
        with evaluating(model):
            for batch in self.held_out.batches(batch_size, max_batches):
                y = batch["labels"].to(device)  # (B, S, S)
                logits = model(batch["images"].to(device))  # (B, 11, S, S)
                loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
                pixels += y.numel()
                count += len(y)
                pred = logits.argmax(1)  # (B, S, S)
                confusion += np.bincount((y * N_CLASSES + pred).flatten().cpu().numpy(),
                                         minlength=N_CLASSES ** 2).reshape(N_CLASSES, N_CLASSES)
        return {"miou": mean_iou(confusion), "pixel_accuracy": float(np.trace(confusion) / confusion.sum()),
                "loss": loss_sum / pixels, **eval_counts(count, self.eval_examples)}
