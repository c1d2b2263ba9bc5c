"""Tiny copies of the user-supplied datasets in their exact standard formats, for tests and
demos: CIFAR-10/100 "python version" pickled batches and TinyImageNet's JPEG folders."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def write_cifar(root: Path, name: str = "cifar10", per_batch: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """Write `<root>/cifar-10-batches-py` (or `cifar-100-python`) with random images.

    Returns the arrays written: "train"/"test" images (N, 32, 32, 3) and "train_labels"/"test_labels".
    """
    gen = np.random.default_rng(seed)
    if name == "cifar10":
        folder, files, label_key, n_classes = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], \
            b"labels", 10
        meta_file, meta = "batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)]}
    else:
        folder, files, label_key, n_classes = "cifar-100-python", ["train"], b"fine_labels", 100
        meta_file, meta = "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)]}
    out = Path(root) / folder
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list] = {"train": [], "train_labels": [], "test": [], "test_labels": []}
    for split, names in (("train", files), ("test", ["test_batch" if name == "cifar10" else "test"])):
        for file in names:
            images = gen.integers(0, 256, size=(per_batch, 32, 32, 3), dtype=np.uint8)  # (N, H, W, C)
            labels = gen.integers(0, n_classes, size=per_batch)
            data = images.transpose(0, 3, 1, 2).reshape(per_batch, 3072)  # channel-major rows, as CIFAR stores
            batch = {b"batch_label": file.encode(), b"data": data, label_key: [int(v) for v in labels],
                     b"filenames": [f"{file}_{i}.png".encode() for i in range(per_batch)]}
            if name == "cifar100":
                batch[b"coarse_labels"] = [int(v) // 5 for v in labels]
            with open(out / file, "wb") as f:
                pickle.dump(batch, f, protocol=2)
            written[split].append(images)
            written[f"{split}_labels"].append(labels)
    with open(out / meta_file, "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return {k: np.concatenate(v) for k, v in written.items()}


def write_tinyimagenet(root: Path, n_classes: int = 3, per_class: int = 4, n_val: int = 6) -> dict:
    """Write `<root>/tiny-imagenet-200` with flat-coloured 64x64 JPEGs (colour = class).

    Returns {"wnids": [...], "colours": (n_classes, 3) uint8, "val_labels": [...]}.
    """
    base = Path(root) / "tiny-imagenet-200"
    wnids = [f"n{10000000 + i:08d}" for i in range(n_classes)]
    colours = np.array([[(60 * i + 40) % 256, (90 * i + 200) % 256, (150 * i + 10) % 256]
                        for i in range(n_classes)], dtype=np.uint8)
    (base / "val" / "images").mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    for c, wnid in enumerate(wnids):
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True, exist_ok=True)
        boxes = []
        for i in range(per_class):
            name = f"{wnid}_{i}.JPEG"
            Image.new("RGB", (64, 64), tuple(int(v) for v in colours[c])).save(folder / name, "JPEG")
            boxes.append(f"{name}\t0\t0\t63\t63\n")
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))
    val_labels, lines = [], []
    for i in range(n_val):
        c = i % n_classes
        name = f"val_{i}.JPEG"
        Image.new("RGB", (64, 64), tuple(int(v) for v in colours[c])).save(base / "val" / "images" / name, "JPEG")
        lines.append(f"{name}\t{wnids[c]}\t0\t0\t63\t63\n")
        val_labels.append(c)
    (base / "val" / "val_annotations.txt").write_text("".join(lines))
    return {"wnids": wnids, "colours": colours, "val_labels": val_labels}
