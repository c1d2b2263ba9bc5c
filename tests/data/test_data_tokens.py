"""Token directories: the writer, memory-mapped reading, the text converter, BPE training."""

from __future__ import annotations

import gzip
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from qkvlab.data.text import build_stdlib, stdlib_files
from qkvlab.data.tokenize import tokenize_files
from qkvlab.data.tokenizer import TextTokenizer, gpt2_tokenizer, train_bpe
from qkvlab.data.tokens import TokenWriter, open_tokens
from qkvlab.errors import QkvlabError


def test_writer_rolls_shards_and_reader_maps_them(tmp_path):
    writer = TokenWriter(tmp_path, vocab_size=1000, tokenizer="toy", shard_tokens=10)
    writer.write("train", np.arange(25), chars=50)
    writer.write("val", [1, 2, 3])
    meta = writer.close()
    assert [s["tokens"] for s in meta["splits"]["train"]] == [10, 10, 5]
    assert (tmp_path / "train-000000.bin").stat().st_size == 20  # uint16
    tokens = open_tokens(tmp_path)
    train = tokens.split("train")
    assert train.n_tokens == 25 and train.chars == 50
    windows = list(train.sequential_windows(4))
    assert [w.tolist() for w in windows] == [[0, 1, 2, 3], [4, 5, 6, 7], [10, 11, 12, 13], [14, 15, 16, 17],
                                             [20, 21, 22, 23]]
    sample = train.random_windows(200, 4, np.random.default_rng(0))  # (200, 4)
    assert sample.shape == (200, 4) and (np.diff(sample, axis=1) == 1).all()  # never across a shard
    assert np.array_equal(sample, train.random_windows(200, 4, np.random.default_rng(0)))
    with pytest.raises(QkvlabError, match="no split 'test'"):
        tokens.split("test")


def test_large_vocabularies_use_uint32(tmp_path):
    writer = TokenWriter(tmp_path, vocab_size=100_000, tokenizer="big")
    writer.write("train", [99_999, 0])
    writer.close()
    tokens = open_tokens(tmp_path)
    assert tokens.meta["dtype"] == "uint32" and tokens.split("train").shards[0].tolist() == [99_999, 0]
    with pytest.raises(QkvlabError, match="out of range"):
        TokenWriter(tmp_path / "x", vocab_size=10, tokenizer="t").write("train", [10])


def test_truncated_shard_is_an_error(tmp_path):
    writer = TokenWriter(tmp_path, vocab_size=10, tokenizer="t")
    writer.write("train", [1, 2, 3])
    writer.close()
    (tmp_path / "train-000000.bin").write_bytes(b"\x01\x00")
    with pytest.raises(QkvlabError, match="has 2 bytes; meta.json records 3 uint16 tokens"):
        open_tokens(tmp_path)
    with pytest.raises(QkvlabError, match="qkvlab data tokenize"):
        open_tokens(tmp_path / "nowhere")


def test_tokenize_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello\nworld\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        for text in ["one", "two", "three"]:
            f.write(json.dumps({"text": text}) + "\n")
    meta = tokenize_files([tmp_path / "a.txt", tmp_path / "b.jsonl.gz"], TextTokenizer("bytes"), tmp_path / "out",
                          val_every=2)
    tokens = open_tokens(tmp_path / "out")
    train = bytes(tokens.split("train").shards[0].tolist()).decode()
    val = bytes(tokens.split("val").shards[0].tolist()).decode()
    assert train == "hello\nworld\ntwo" and val == "onethree"  # documents 2 and 4 go to val
    assert meta["chars"] == {"train": 15, "val": 8} and meta["tokenizer"] == "bytes"
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(QkvlabError, match=r"bad.jsonl:1 is not a JSON object"):
        tokenize_files([tmp_path / "bad.jsonl"], TextTokenizer("bytes"), tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_tokenize_with_gpt2_separates_documents(fetched, tmp_path):
    fetched("gpt2")
    (tmp_path / "t.txt").write_text("hello world")
    (tmp_path / "v.txt").write_text("hello")
    tokenize_files([tmp_path / "t.txt"], gpt2_tokenizer(), tmp_path / "out", val_files=[tmp_path / "v.txt"])
    tokens = open_tokens(tmp_path / "out")
    assert tokens.split("train").shards[0].tolist() == [31373, 995, 50256]
    assert tokens.split("val").shards[0].tolist() == [31373, 50256]
    assert tokens.vocab_size == 50257 and tokens.meta["dtype"] == "uint16"


def test_bpe_training_is_deterministic_and_round_trips(tmp_path):
    files = stdlib_files()[:40]
    assert all(str(f).startswith(sysconfig.get_paths()["stdlib"]) for f in files)
    texts = [f.read_text(encoding="utf-8") for f in files[:10]]
    a, b = train_bpe(texts, 600), train_bpe(texts, 600)
    assert a.to_str() == b.to_str()
    tok = TextTokenizer("bpe", a)
    assert tok.vocab_size == 600 and tok.eot == 0
    assert tok.decode(tok.encode(texts[0])) == texts[0]
    info = build_stdlib(files, tmp_path, vocab_size=600)
    tokens = open_tokens(tmp_path)
    assert info["files"] == len(files) and tokens.vocab_size == 600
    assert tokens.split("val").n_tokens > 0 and tokens.split("train").n_tokens > 10 * tokens.split("val").n_tokens
    assert Path(tmp_path / "tokenizer.json").is_file()
