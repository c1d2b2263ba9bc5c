"""CIFAR-10 / CIFAR-100 from the standard "python version" pickled batches a user supplies.

CIFAR-10: `cifar-10-batches-py/{data_batch_1..5,test_batch}` with b"data" uint8 (N, 3072) and
b"labels"; CIFAR-100: `cifar-100-python/{train,test}` with b"data" and b"fine_labels".
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from qkvlab.data.cache import cache_root
from qkvlab.data.images import ImageSet
from qkvlab.errors import QkvlabError

LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                b"labels", "batches.meta", b"label_names", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", "meta", b"fine_label_names", 100),
}

# The globals a CIFAR pickle may name (numpy arrays); anything else is refused.
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
            ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise QkvlabError(f"refusing to unpickle {module}.{name}: not a CIFAR batch")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return _Unpickler(f, encoding="bytes").load()


def layout_help(name: str) -> str:
    folder, train, test, label_key, *_ = LAYOUTS[name]
    return (f"{folder}/ with {', '.join(train)}, {', '.join(test)} (the CIFAR 'python version': "
            f"pickled dicts with b'data' uint8 (N, 3072) and {label_key!r})")


def find_cifar(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the batches of `name`, searched in `data_dir` (or the cache)."""
    folder, train, *_ = LAYOUTS[name]
    base = Path(data_dir).expanduser() if data_dir is not None else cache_root()
    for candidate in (base, base / folder, base / name, base / name / folder):
        if (candidate / train[0]).is_file():
            return candidate
    raise QkvlabError(f"{name} not found in {base}: expected {layout_help(name)}; "
                      f"download it yourself and pass --data-dir DIR")


def _read_batches(folder: Path, files: list[str], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for file in files:
        path = folder / file
        if not path.is_file():
            raise QkvlabError(f"missing CIFAR batch {path}")
        batch = _load_pickle(path)
        if b"data" not in batch or label_key not in batch:
            raise QkvlabError(f"{path} has no b'data' or {label_key!r}: not a CIFAR batch")
        data = np.asarray(batch[b"data"], dtype=np.uint8)  # (N, 3072)
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # (N, 32, 32, 3)
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def load_cifar(name: str = "cifar10", data_dir: str | os.PathLike | None = None) -> ImageSet:
    """CIFAR-10 or CIFAR-100 (fine labels) from the standard pickled batches."""
    if name not in LAYOUTS:
        raise QkvlabError(f"unknown CIFAR set {name!r}; accepted: {', '.join(LAYOUTS)}")
    _, train, test, label_key, meta_file, names_key, n_classes = LAYOUTS[name]
    folder = find_cifar(name, data_dir)
    train_x, train_y = _read_batches(folder, train, label_key)
    test_x, test_y = _read_batches(folder, test, label_key)
    classes = tuple(str(i) for i in range(n_classes))
    if (folder / meta_file).is_file():
        meta = _load_pickle(folder / meta_file)
        if names_key in meta and len(meta[names_key]) == n_classes:
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key])
    for split, y in (("train", train_y), ("test", test_y)):
        if len(y) and (y.min() < 0 or y.max() >= n_classes):
            raise QkvlabError(f"{name} {split} labels must be in [0, {n_classes}), got {y.min()}..{y.max()}")
    return ImageSet(name, train_x, train_y, test_x, test_y, classes)
