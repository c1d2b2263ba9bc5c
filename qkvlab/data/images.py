"""An image classification dataset in memory-mappable .npy files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qkvlab.errors import QkvlabError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class ImageSet:
    """Images as uint8 (N, H, W, C) and int64 labels (N,), a train and a test split."""

    name: str
    train_images: np.ndarray  # (N, H, W, C) uint8
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray  # (M, H, W, C) uint8
    test_labels: np.ndarray  # (M,) int64
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        for split in SPLITS:
            images, labels = self.split(split)
            if images.ndim != 4 or images.dtype != np.uint8:
                raise QkvlabError(f"{self.name} {split} images must be uint8 (N, H, W, C), "
                                  f"got {images.dtype} {images.shape}")
            if len(images) != len(labels):
                raise QkvlabError(f"{self.name} {split}: {len(images)} images but {len(labels)} labels")

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split not in SPLITS:
            raise QkvlabError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        return getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[3])

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def save_image_set(images: dict[str, np.ndarray], labels: dict[str, np.ndarray], out: Path) -> dict:
    """Write `<split>_images.npy` / `<split>_labels.npy` into `out`; returns the counts."""
    counts = {}
    for split in SPLITS:
        x = np.ascontiguousarray(images[split], dtype=np.uint8)
        if x.ndim == 3:
            x = x[..., None]  # (N, H, W) -> (N, H, W, 1)
        np.save(out / f"{split}_images.npy", x)
        np.save(out / f"{split}_labels.npy", np.asarray(labels[split], dtype=np.int64))
        counts[split] = int(len(x))
    return counts


def load_image_set(name: str, path: Path, classes: tuple[str, ...]) -> ImageSet:
    """The image set saved by `save_image_set` in `path` (images memory-mapped)."""
    arrays = {}
    for split in SPLITS:
        arrays[f"{split}_images"] = np.load(path / f"{split}_images.npy", mmap_mode="r")
        arrays[f"{split}_labels"] = np.load(path / f"{split}_labels.npy")
    return ImageSet(name=name, classes=classes, **arrays)
