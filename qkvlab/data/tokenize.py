"""Convert text files into a token directory (`qkvlab data tokenize`), streaming.

Inputs: plain text (`.txt` or anything else: one document per file) and JSON lines (`.jsonl`:
one document per line, its "text" field), either optionally gzip-compressed (`.gz`).
Documents are separated by the tokenizer's end-of-text token when it has one. Every
`val_every`-th document goes to the `val` split, or the files given as `val_files` do.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from qkvlab.atomic import atomic_dir
from qkvlab.data.tokenizer import TextTokenizer
from qkvlab.data.tokens import TokenWriter
from qkvlab.errors import QkvlabError

BLOCK_CHARS = 1 << 22  # long plain-text files are encoded in blocks of ~4 M characters, cut at newlines
BATCH_DOCS = 256
BATCH_CHARS = 1 << 24  # encode at most ~16 M characters at a time


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def documents(path: Path) -> Iterator[list[str]]:
    """Each document of `path` as a list of text blocks."""
    stem = path.name[:-3] if path.suffix == ".gz" else path.name
    with _open(path) as f:
        if stem.endswith(".jsonl"):
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield [json.loads(line)["text"]]
                    except (ValueError, KeyError, TypeError):
                        raise QkvlabError(f"{path}:{lineno} is not a JSON object with a \"text\" field") from None
            return
        blocks, pending = [], ""
        while chunk := f.read(BLOCK_CHARS):
            pending += chunk
            cut = pending.rfind("\n") + 1
            if cut:
                blocks.append(pending[:cut])
                pending = pending[cut:]
        if pending:
            blocks.append(pending)
        yield blocks


def tokenize_files(files: Sequence[str | os.PathLike], tokenizer: TextTokenizer, out: str | os.PathLike,
                   val_every: int = 100, val_files: Sequence[str | os.PathLike] = (),
                   shard_tokens: int = 1 << 27) -> dict:
    """Tokenize `files` (+ `val_files`) into the token directory `out` (written atomically)."""
    paths = [Path(f).expanduser() for f in files]
    val_paths = [Path(f).expanduser() for f in val_files]
    for p in [*paths, *val_paths]:
        if not p.is_file():
            raise QkvlabError(f"input file {p} does not exist")
    if val_every < 1:
        raise QkvlabError(f"--val-every must be a positive integer, got {val_every}")
    out = Path(out).expanduser()
    with atomic_dir(out) as tmp:
        writer = TokenWriter(tmp, tokenizer.vocab_size, tokenizer.name, eot=tokenizer.eot, shard_tokens=shard_tokens)
        buffer: list[tuple[str, str, bool]] = []
        chars = 0
        for item in _blocks(paths, val_paths, val_every):
            buffer.append(item)
            chars += len(item[1])
            if len(buffer) >= BATCH_DOCS or chars >= BATCH_CHARS:
                _flush(buffer, tokenizer, writer)
                chars = 0
        _flush(buffer, tokenizer, writer)
        meta = writer.close()
    return meta


def _blocks(paths: list[Path], val_paths: list[Path], val_every: int) -> Iterator[tuple[str, str, bool]]:
    """(split, text block, whether the block ends its document), in input order."""
    index = 0
    for path, fixed in [*((p, "train" if val_paths else None) for p in paths), *((p, "val") for p in val_paths)]:
        for blocks in documents(path):
            split = fixed or ("val" if index % val_every == val_every - 1 else "train")
            index += 1
            for i, block in enumerate(blocks):
                yield split, block, i == len(blocks) - 1


def _flush(buffer: list[tuple[str, str, bool]], tokenizer: TextTokenizer, writer: TokenWriter) -> None:
    end = [tokenizer.eot] if tokenizer.eot is not None else []
    for (split, block, last), ids in zip(buffer, tokenizer.encode_batch([b for _, b, _ in buffer])):
        writer.write(split, ids + end if last else ids, chars=len(block))
    buffer.clear()
