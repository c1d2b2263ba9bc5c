"""CIFAR and TinyImageNet loaders on tiny copies written in the exact standard formats."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from qkvlab.data.cifar import load_cifar
from qkvlab.data.samples import write_cifar, write_tinyimagenet
from qkvlab.data.tinyimagenet import load_tinyimagenet
from qkvlab.errors import QkvlabError


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reads_pickled_batches(tmp_path, name):
    written = write_cifar(tmp_path, name, per_batch=7)
    data = load_cifar(name, tmp_path)  # the parent of cifar-10-batches-py is accepted
    n_train = 35 if name == "cifar10" else 7
    assert data.train_images.shape == (n_train, 32, 32, 3) and data.test_images.shape == (7, 32, 32, 3)
    assert np.array_equal(data.train_images, written["train"])  # (N, 3072) rows are channel-major
    assert np.array_equal(data.test_labels, written["test_labels"])
    assert data.n_classes == (10 if name == "cifar10" else 100)
    assert data.classes[3] == ("class3" if name == "cifar10" else "fine3")
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    assert np.array_equal(load_cifar(name, tmp_path / folder).train_labels, written["train_labels"])


def test_cifar_absent_names_the_layout(tmp_path):
    with pytest.raises(QkvlabError, match=r"cifar10 not found in .*cifar-10-batches-py/ with data_batch_1"):
        load_cifar("cifar10", tmp_path)
    with pytest.raises(QkvlabError, match="cifar-100-python/ with train, test"):
        load_cifar("cifar100", tmp_path)


def test_cifar_refuses_foreign_pickles(tmp_path):
    write_cifar(tmp_path, "cifar10", per_batch=2)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(QkvlabError, match=r"refusing to unpickle .*print: not a CIFAR batch"):
        load_cifar("cifar10", tmp_path)


def test_tinyimagenet_reads_jpeg_folders_once(tmp_path):
    info = write_tinyimagenet(tmp_path / "user", n_classes=3, per_class=4, n_val=5)
    data = load_tinyimagenet(tmp_path / "user", cache=tmp_path / "cache")
    assert data.train_images.shape == (12, 64, 64, 3) and data.test_images.shape == (5, 64, 64, 3)
    assert data.train_labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert data.test_labels.tolist() == info["val_labels"]
    assert data.classes == tuple(info["wnids"])
    centre = data.train_images[:, 32, 32].astype(int)  # flat colours survive JPEG within a few levels
    assert np.abs(centre - info["colours"][data.train_labels].astype(int)).max() <= 4
    ready = tmp_path / "cache" / "tinyimagenet-npy" / "READY.json"
    stamp = ready.stat().st_mtime_ns
    load_tinyimagenet(tmp_path / "user" / "tiny-imagenet-200", cache=tmp_path / "cache")
    assert ready.stat().st_mtime_ns == stamp  # decoded once, then read from the .npy cache


def test_tinyimagenet_absent_names_the_layout(tmp_path):
    with pytest.raises(QkvlabError, match=r"wnids.txt, train/<wnid>/images/\*.JPEG"):
        load_tinyimagenet(tmp_path, cache=tmp_path)
