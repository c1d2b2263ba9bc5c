"""TinyImageNet (200 classes of 64x64) from the standard files a user supplies.

Layout: `tiny-imagenet-200/wnids.txt`, `train/<wnid>/images/*.JPEG`,
`val/images/*.JPEG` with `val/val_annotations.txt` (file, wnid, box). The test split is `val`.
The JPEGs are decoded once into .npy files in the cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from qkvlab.atomic import atomic_dir, atomic_write_json
from qkvlab.data.cache import READY, cache_root, read_ready
from qkvlab.data.images import ImageSet, load_image_set, save_image_set
from qkvlab.errors import QkvlabError

SIZE = 64
LAYOUT = ("tiny-imagenet-200/ with wnids.txt, train/<wnid>/images/*.JPEG, "
          "val/images/*.JPEG and val/val_annotations.txt")


def find_tinyimagenet(data_dir: str | os.PathLike | None = None) -> Path:
    base = Path(data_dir).expanduser() if data_dir is not None else cache_root()
    for candidate in (base, base / "tiny-imagenet-200", base / "tinyimagenet",
                      base / "tinyimagenet" / "tiny-imagenet-200"):
        if (candidate / "wnids.txt").is_file() and (candidate / "train").is_dir():
            return candidate
    raise QkvlabError(f"TinyImageNet not found in {base}: expected {LAYOUT}; "
                      "download it yourself and pass --data-dir DIR")


def _read_image(path: Path) -> np.ndarray:
    with Image.open(path) as file:
        img = file.convert("RGB")
        if img.size != (SIZE, SIZE):
            img = img.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8)  # (64, 64, 3)


def _decode(root: Path) -> tuple[dict, dict, tuple[str, ...]]:
    wnids = tuple(line.strip() for line in (root / "wnids.txt").read_text().splitlines() if line.strip())
    index = {w: i for i, w in enumerate(wnids)}
    train_files, train_labels = [], []
    for wnid in wnids:
        files = sorted((root / "train" / wnid / "images").glob("*.JPEG"))
        if not files:
            raise QkvlabError(f"TinyImageNet: no images in {root / 'train' / wnid / 'images'}; expected {LAYOUT}")
        train_files += files
        train_labels += [index[wnid]] * len(files)
    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise QkvlabError(f"TinyImageNet: missing {annotations}; expected {LAYOUT}")
    val_files, val_labels = [], []
    for line in annotations.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) < 2:
            continue
        if fields[1] not in index:
            raise QkvlabError(f"{annotations}: wnid {fields[1]!r} is not in wnids.txt")
        val_files.append(root / "val" / "images" / fields[0])
        val_labels.append(index[fields[1]])
    images = {"train": np.stack([_read_image(f) for f in train_files]),
              "test": np.stack([_read_image(f) for f in val_files]) if val_files
              else np.zeros((0, SIZE, SIZE, 3), np.uint8)}
    labels = {"train": np.array(train_labels), "test": np.array(val_labels)}
    return images, labels, wnids


def load_tinyimagenet(data_dir: str | os.PathLike | None = None,
                      cache: str | os.PathLike | None = None) -> ImageSet:
    """TinyImageNet from `data_dir`, decoded once into `<cache>/tinyimagenet-npy`."""
    root = find_tinyimagenet(data_dir).resolve()
    out = cache_root(cache) / "tinyimagenet-npy"
    if not ((out / READY).is_file() and read_ready(out).get("source") == str(root)):
        images, labels, wnids = _decode(root)
        with atomic_dir(out) as tmp:
            counts = save_image_set(images, labels, tmp)
            atomic_write_json(tmp / READY, {"source": str(root), "counts": counts, "classes": list(wnids)})
    return load_image_set("tinyimagenet", out, tuple(read_ready(out)["classes"]))
