"""Token streams in memory-mapped files: the format every language-modelling task reads.

A token directory holds `meta.json` and flat little-endian shards (`<split>-000000.bin`, ...)
of uint16 (vocabularies up to 65,536) or uint32. Training windows are sampled inside one shard,
so a directory of SlimPajama-sized shards streams from disk without loading it::

    {"format": "qkvlab-tokens/1", "dtype": "uint16", "vocab_size": 50257, "tokenizer": "gpt2",
     "eot": 50256, "splits": {"train": [{"file": "train-000000.bin", "tokens": 1000000}], ...},
     "chars": {"train": 4000000, ...}}

`chars` (optional) is the number of characters each split encodes, for bits per character.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from qkvlab.atomic import atomic_write_json
from qkvlab.data.cache import read_json
from qkvlab.errors import QkvlabError

FORMAT = "qkvlab-tokens/1"
META = "meta.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class TokenWriter:
    """Append token ids to a split's shards in `out`; `close()` writes meta.json."""

    def __init__(self, out: Path, vocab_size: int, tokenizer: str, eot: int | None = None,
                 shard_tokens: int = 1 << 27, extra: dict | None = None) -> None:
        if not (isinstance(shard_tokens, int) and shard_tokens >= 1):
            raise QkvlabError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        self.shard_tokens = shard_tokens
        self.meta = {"format": FORMAT, "dtype": self.dtype.name, "vocab_size": vocab_size,
                     "tokenizer": tokenizer, "eot": eot, "splits": {}, "chars": {}, **(extra or {})}
        self._files: dict[str, BinaryIO] = {}

    def write(self, split: str, ids: Iterable[int] | np.ndarray, chars: int = 0) -> None:
        """Append `ids` to `split` (and count `chars` characters of source text)."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise QkvlabError(f"token id out of range [0, {self.vocab_size}) in split {split!r}")
        ids = ids.astype(self.dtype)
        shards = self.meta["splits"].setdefault(split, [])
        self.meta["chars"][split] = self.meta["chars"].get(split, 0) + int(chars)
        while ids.size:
            if not shards or shards[-1]["tokens"] >= self.shard_tokens:
                self._roll(split, shards)
            room = self.shard_tokens - shards[-1]["tokens"]
            chunk, ids = ids[:room], ids[room:]
            self._files[split].write(chunk.tobytes())
            shards[-1]["tokens"] += int(chunk.size)

    def _roll(self, split: str, shards: list[dict]) -> None:
        if split in self._files:
            self._files[split].close()
        name = f"{split}-{len(shards):06d}.bin"
        self._files[split] = open(self.out / name, "wb")
        shards.append({"file": name, "tokens": 0})

    def close(self) -> dict:
        for f in self._files.values():
            f.close()
        self._files = {}
        atomic_write_json(self.out / META, self.meta)
        return self.meta


@dataclass
class TokenSplit:
    """One split's shards, memory-mapped; windows are sampled inside a single shard."""

    shards: list[np.ndarray] = field(default_factory=list)
    chars: int = 0

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.shards)

    def random_windows(self, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """`n` windows of `length` tokens at uniform random starts: (n, length) int64."""
        valid = np.array([max(len(s) - length + 1, 0) for s in self.shards], dtype=np.int64)
        if valid.sum() == 0:
            raise QkvlabError(f"no shard holds {length} tokens; use a shorter context")
        starts = rng.integers(0, valid.sum(), size=n)  # (n,)
        cum = np.cumsum(valid)
        which = np.searchsorted(cum, starts, side="right")  # (n,)
        offsets = starts - (cum - valid)[which]
        return np.stack([np.asarray(self.shards[w][o:o + length], dtype=np.int64)
                         for w, o in zip(which, offsets, strict=True)])

    def sequential_windows(self, length: int, limit: int | None = None) -> Iterable[np.ndarray]:
        """Non-overlapping windows of `length` tokens from the start of each shard, in order."""
        count = 0
        for shard in self.shards:
            for start in range(0, len(shard) - length + 1, length):
                if limit is not None and count >= limit:
                    return
                yield np.asarray(shard[start:start + length], dtype=np.int64)
                count += 1


@dataclass
class TokenDir:
    """A token directory opened for reading."""

    path: Path
    meta: dict
    splits: dict[str, TokenSplit]

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def split(self, name: str) -> TokenSplit:
        if name not in self.splits:
            raise QkvlabError(f"token directory {self.path} has no split {name!r}; "
                              f"it has: {', '.join(self.splits) or 'none'}")
        return self.splits[name]


def open_tokens(path: str | os.PathLike) -> TokenDir:
    """Open a token directory written by `TokenWriter` (or `qkvlab data tokenize`)."""
    path = Path(path).expanduser()
    if not (path / META).is_file():
        raise QkvlabError(f"{path} is not a token directory (no {META}); "
                          "make one with: qkvlab data tokenize --tokenizer gpt2 --out DIR FILES...")
    meta = read_json(path / META, dict, "a token directory's metadata")
    if meta.get("format") != FORMAT:
        raise QkvlabError(f"{path / META}: format {meta.get('format')!r} is not {FORMAT!r}")
    splits = {}
    for name, shards in shard_sizes(path, meta).items():
        maps: list[np.ndarray] = []
        for file, tokens, size in shards:
            if not file.is_file() or file.stat().st_size != size:
                found = f"has {file.stat().st_size} bytes" if file.is_file() else "is missing"
                raise QkvlabError(f"{file} {found}; {META} records {tokens} {meta['dtype']} tokens ({size} bytes)")
            if tokens:
                maps.append(np.memmap(file, dtype=np.dtype(meta["dtype"]), mode="r"))
        splits[name] = TokenSplit(maps, int(meta.get("chars", {}).get(name, 0)))
    return TokenDir(path, meta, splits)


def shard_sizes(path: Path, meta: dict) -> dict[str, list[tuple[Path, int, int]]]:
    """(file, tokens, bytes) of each split's shards as `meta` (a token directory's meta.json) records them."""
    try:
        dtype = np.dtype(meta["dtype"])
        return {name: [(path / s["file"], int(s["tokens"]), int(s["tokens"]) * dtype.itemsize) for s in shards]
                for name, shards in meta["splits"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise QkvlabError(f"{path / META} is malformed ({type(err).__name__}: {err})") from None
