"""The fetched datasets: checksums still match, shapes and counts are the published ones."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from qkvlab.data.fetch import verify
from qkvlab.data.idx import read_idx
from qkvlab.data.mnist import load_mnist
from qkvlab.data.sources import GROUPS, SOURCES
from qkvlab.data.text import load_vocab
from qkvlab.data.tokenizer import gpt2_tokenizer, load_tokenizer
from qkvlab.data.tokens import open_tokens
from qkvlab.errors import QkvlabError


@pytest.mark.parametrize("name", GROUPS["test"])
def test_raw_files_match_recorded_checksums(fetched, name):
    assert verify(SOURCES[name], fetched(name) / "raw") == []


def test_mnist_shapes_and_pixels(fetched):
    fetched("mnist")
    data = load_mnist("mnist")
    assert data.train_images.shape == (60_000, 28, 28, 1) and data.test_images.shape == (10_000, 28, 28, 1)
    assert data.train_images.dtype == np.uint8 and data.train_labels.shape == (60_000,)
    assert np.bincount(data.train_labels).tolist()[:2] == [5923, 6742]
    assert abs(data.train_images[:].mean() / 255 - 0.1307) < 1e-3
    assert data.classes == tuple("0123456789")


def test_fashion_mnist_has_6000_per_class(fetched):
    fetched("fashion-mnist")
    data = load_mnist("fashion-mnist")
    assert data.train_images.shape == (60_000, 28, 28, 1) and data.test_images.shape == (10_000, 28, 28, 1)
    assert np.bincount(data.train_labels).tolist() == [6000] * 10
    assert np.bincount(data.test_labels).tolist() == [1000] * 10
    assert data.classes[9] == "Ankle boot"


def test_ptb_standard_split(fetched):
    tokens = open_tokens(fetched("ptb"))
    assert tokens.meta["words"] == {"train": 887_521, "val": 70_390, "test": 78_669}
    # each sentence ends with <eos>: 42,068 / 3,370 / 3,761 sentences
    assert {s: tokens.split(s).n_tokens for s in ("train", "val", "test")} == \
        {"train": 929_589, "val": 73_760, "test": 82_430}
    vocab = load_vocab(fetched("ptb"))
    assert tokens.vocab_size == len(vocab) == 10_000 and len(set(vocab)) == 10_000
    assert "<eos>" in vocab and "<unk>" in vocab and tokens.meta["eot"] == vocab.index("<eos>")
    train = np.asarray(tokens.split("train").shards[0][:12])
    assert " ".join(vocab[i] for i in train).startswith("aer banknote berlitz calloway centrust")


def test_shakespeare_characters(fetched):
    tokens = open_tokens(fetched("shakespeare"))
    vocab = load_vocab(fetched("shakespeare"))
    assert len(vocab) == tokens.vocab_size == 84
    train, val = tokens.split("train"), tokens.split("val")
    assert train.n_tokens + val.n_tokens == 5_057_198 == train.chars + val.chars
    assert abs(val.n_tokens / 5_057_198 - 0.1) < 1e-3
    text = "".join(vocab[i] for i in train.shards[0][:25])
    assert text == "ALL'S WELL THAT ENDS WELL"


def test_gpt2_tokenizer_matches_the_original(fetched):
    fetched("gpt2")
    tok = gpt2_tokenizer()
    assert tok.encode("hello world") == [31373, 995]
    assert tok.encode(" Hello, world!\n\n") == [18435, 11, 995, 0, 628]
    assert tok.vocab_size == 50_257 and tok.eot == 50_256
    assert tok.encode("a<|endoftext|>b") == [64, 50_256, 65]
    text = "Naïve café — 日本語 tokens\tand  spaces"
    assert tok.decode(tok.encode(text)) == text


def test_unknown_tokenizer_lists_names():
    with pytest.raises(QkvlabError, match="accepted: gpt2, stdlib-bpe, bytes"):
        load_tokenizer("sentencepiece")
    assert load_tokenizer("bytes").encode("hé") == [104, 195, 169]


def test_idx_reader_round_trip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + np.array([2, 3, 4], dtype=">u4").tobytes()
    (tmp_path / "x-idx3-ubyte").write_bytes(header + images.tobytes())
    with gzip.open(tmp_path / "x-idx3-ubyte.gz", "wb") as f:
        f.write(header + images.tobytes())
    assert np.array_equal(read_idx(tmp_path / "x-idx3-ubyte"), images)
    assert np.array_equal(read_idx(tmp_path / "x-idx3-ubyte.gz"), images)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(QkvlabError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
