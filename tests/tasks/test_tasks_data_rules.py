"""Vision sampling and augmentation, set anomaly sets, AUROC, segmentation canvases, mean IoU,
and language-model windows."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from qkvlab.data.images import ImageSet
from qkvlab.data.tokens import TokenWriter
from qkvlab.tasks.anomaly import SetAnomalyTask, auroc
from qkvlab.tasks.common import EpochSampler
from qkvlab.tasks.language import LanguageModelTask
from qkvlab.tasks.segmentation import BACKGROUND, composite, mean_iou
from qkvlab.tasks.vision import Augment, augment


def test_each_epoch_visits_every_example_once():
    sampler = EpochSampler(10)
    seen = np.concatenate([sampler.indices(step, 4, seed=3) for step in range(5)])  # 20 = two epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert not np.array_equal(seen[:10], seen[10:])  # a new permutation each epoch
    assert np.array_equal(sampler.indices(2, 4, seed=3), EpochSampler(10).indices(2, 4, seed=3))


def test_crop_is_a_shift_and_flip_mirrors():
    images = np.random.default_rng(0).integers(1, 256, size=(16, 8, 8, 1), dtype=np.uint8)
    out = augment(images, Augment(pad=2), np.random.default_rng(1))
    for img, crop in zip(images, out, strict=True):
        padded = np.pad(img, ((2, 2), (2, 2), (0, 0)))  # (12, 12, 1)
        matches = [(dy, dx) for dy, dx in itertools.product(range(-2, 3), repeat=2)
                   if np.array_equal(crop, padded[2 + dy:10 + dy, 2 + dx:10 + dx])]
        assert matches  # the crop is the padded image shifted by at most 2 pixels
    flipped = augment(images, Augment(flip=True), np.random.default_rng(2))
    same = [np.array_equal(a, b) for a, b in zip(images, flipped, strict=True)]
    mirrored = [np.array_equal(a[:, ::-1], b) for a, b in zip(images, flipped, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True)) and any(same) and any(mirrored)


def _digits(n_per_class: int = 5) -> ImageSet:
    gen = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), n_per_class)
    images = gen.integers(0, 256, size=(len(labels), 28, 28, 1), dtype=np.uint8)
    return ImageSet("digits", images, labels, images.copy(), labels.copy(), tuple("0123456789"))


def test_each_set_has_exactly_one_odd_image():
    data = _digits()
    task = SetAnomalyTask("sets", lambda: data, set_size=6)
    index, odd = task.sets("train", 200, np.random.default_rng(0))
    for row, o in zip(index, odd, strict=True):
        classes = data.train_labels[row]
        normal = np.delete(classes, o)
        assert (normal == normal[0]).all() and classes[o] != normal[0]
    assert len(set(odd.tolist())) == 6  # the odd one is anywhere
    batch = task.train_batch(0, 4, seed=0)
    assert batch["sets"].shape == (4, 6, 784) and batch["odd"].shape == (4,)


def test_auroc_matches_pairwise_counting():
    gen = np.random.default_rng(0)
    scores = gen.integers(0, 5, size=60).astype(float)  # many ties
    labels = gen.random(60) < 0.4
    pos, neg = scores[labels], scores[~labels]
    pairwise = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auroc(scores, labels) == pytest.approx(pairwise)
    assert auroc([0.1, 0.2, 0.9, 0.8], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.1, 0.2], [0, 0, 1, 1]) == 0.0


def test_segmentation_labels_match_pixels():
    gen = np.random.default_rng(0)
    digits = gen.integers(0, 256, size=(6, 3, 28, 28), dtype=np.uint8)
    digits[digits < 100] = 0  # strokes on a dark background, like MNIST
    classes = gen.integers(0, 10, size=(6, 3))
    canvas, labels, offsets = composite(digits, classes, 56, gen)
    assert canvas.shape == labels.shape == (6, 56, 56)
    for b in range(6):
        layers = np.zeros((3, 56, 56), dtype=np.uint8)
        for d in range(3):
            r, c = offsets[b, d]
            layers[d, r:r + 28, c:c + 28] = digits[b, d]
        assert np.array_equal(canvas[b], layers.max(0))
        assert np.array_equal(labels[b] == BACKGROUND, canvas[b] < 128)
        ys, xs = np.nonzero(labels[b] != BACKGROUND)
        for y, x in zip(ys, xs, strict=True):
            owners = [d for d in range(3) if layers[d, y, x] == canvas[b, y, x]]
            assert labels[b, y, x] in classes[b, owners]  # the label is the class of a brightest digit there


def test_mean_iou():
    confusion = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])  # class 2 never occurs: left out
    assert mean_iou(confusion) == pytest.approx((3 / 4 + 2 / 3) / 2)


class Uniform(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.vocab) + self.dummy  # (B, T, V)


def test_language_windows_and_perplexity(tmp_path):
    writer = TokenWriter(tmp_path, vocab_size=50, tokenizer="toy")
    writer.write("train", np.arange(1000) % 50)
    writer.write("val", np.arange(300) % 50, chars=600)
    writer.close()
    task = LanguageModelTask("toy", lambda: tmp_path, context=16)
    batch = task.train_batch(3, 5, seed=0)
    tokens = batch["tokens"]
    assert tokens.shape == (5, 17) and ((tokens[:, 1:] - tokens[:, :-1]) % 50 == 1).all()
    assert torch.equal(tokens, task.train_batch(3, 5, seed=0)["tokens"])
    metrics = task.evaluate(Uniform(50), batch_size=4, max_batches=2)
    assert metrics["perplexity"] == pytest.approx(50, rel=1e-5)
    assert metrics["bits_per_char"] == pytest.approx(math.log2(50) * 300 / 600, rel=1e-5)
    assert task.model_config("Q-MQA", "quick").max_seq_len == 16


def test_augmentation_follows_the_preset():
    from qkvlab.tasks.vision import ClassificationTask

    data = _digits()
    task = ClassificationTask("toy", lambda: data, 28, 1, 7, 10, Augment(pad=2, flip=True))
    task.setup(task.model_config("QKV", "quick"), "quick")
    plain = task.train_batch(0, 16, seed=0)
    task.setup(task.model_config("QKV", "full"), "full")
    augmented = task.train_batch(0, 16, seed=0)
    assert torch.equal(plain["labels"], augmented["labels"])
    assert not torch.equal(plain["images"], augmented["images"])
    assert plain["images"].shape == (16, 1, 28, 28) and abs(plain["images"].mean().item()) < 0.2
    assert torch.equal(augmented["images"], task.train_batch(0, 16, seed=0)["images"])
