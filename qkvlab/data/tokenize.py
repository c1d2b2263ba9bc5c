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
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from qkvlab.atomic import atomic_dir, check_output
from qkvlab.data.tokenizer import TextTokenizer, VocabTokenizer
from qkvlab.data.tokens import TokenWriter
from qkvlab.errors import QkvlabError, check

BLOCK_CHARS = 1 << 22  # long plain-text files are encoded in blocks of ~4 M characters, cut at newlines
BATCH_DOCS = 256
BATCH_CHARS = 1 << 24  # encode at most ~16 M characters at a time
MIN_SHARD_TOKENS, MAX_SHARD_TOKENS = 1024, 1 << 40  # a shard of fewer tokens is a typo, not a choice
MAX_VAL_EVERY = 1 << 40


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def documents(path: Path) -> Iterator[list[str]]:
    """Each document of `path` as a list of text blocks; a one-line error naming `path` if unreadable."""
    try:
        yield from _documents(path)
    except UnicodeDecodeError as err:
        raise QkvlabError(f"{path} is not UTF-8 text (byte {err.start} of the decoded stream: "
                          f"{err.object[err.start:err.start + 1]!r}); convert it to UTF-8 first") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise QkvlabError(f"{path} is not a readable gzip file: {err or 'truncated'}") from None


def _documents(path: Path) -> Iterator[list[str]]:
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


def check_inputs(paths: Sequence[Path]) -> None:
    """Every input must be a readable file (a directory is named as such)."""
    for p in paths:
        if p.is_dir():
            raise QkvlabError(f"input {p} is a directory; pass the files inside it (e.g. {p}/*.txt)")
        if not p.is_file():
            raise QkvlabError(f"input file {p} does not exist")
        if not os.access(p, os.R_OK):
            raise QkvlabError(f"input file {p} is not readable (permission denied)")


def tokenize_files(files: Sequence[str | os.PathLike], tokenizer: TextTokenizer | VocabTokenizer,
                   out: str | os.PathLike, val_every: int = 100, val_files: Sequence[str | os.PathLike] = (),
                   shard_tokens: int = 1 << 27, force: bool = False, sources: Sequence[str | os.PathLike] = ()) -> dict:
    """Tokenize `files` (+ `val_files`) into the token directory `out` (written atomically).

    An existing non-empty `out` is replaced only with `force`; `out` may never be, contain or lie
    inside an input (`files`, `val_files` or other `sources` such as the tokenizer's file).
    """
    paths = [Path(f).expanduser() for f in files]
    val_paths = [Path(f).expanduser() for f in val_files]
    check(len(paths) > 0, "no input files to tokenize")
    check_inputs([*paths, *val_paths])
    check(type(val_every) is int and 1 <= val_every <= MAX_VAL_EVERY,
          f"--val-every must be an integer in [1, {MAX_VAL_EVERY}], got {val_every!r}")
    check(type(shard_tokens) is int and MIN_SHARD_TOKENS <= shard_tokens <= MAX_SHARD_TOKENS,
          f"--shard-tokens must be an integer in [{MIN_SHARD_TOKENS}, {MAX_SHARD_TOKENS}], got {shard_tokens!r}")
    out = check_output(out, force, sources=[*paths, *val_paths, *sources])
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
        if isinstance(tokenizer, TextTokenizer) and tokenizer._tok is not None:  # the directory knows its tokenizer
            (tmp / "tokenizer.json").write_text(tokenizer._tok.to_str(), encoding="utf-8")
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


def _flush(buffer: list[tuple[str, str, bool]], tokenizer: TextTokenizer | VocabTokenizer, writer: TokenWriter) -> None:
    end = [tokenizer.eot] if tokenizer.eot is not None else []
    blocks = [b for _, b, _ in buffer]
    # a character/word vocabulary (shakespeare, ptb, a token directory) encodes one text at a time
    encoded = (tokenizer.encode_batch(blocks) if isinstance(tokenizer, TextTokenizer)
               else [tokenizer.encode(b) for b in blocks])
    for (split, block, last), ids in zip(buffer, encoded, strict=True):
        writer.write(split, ids + end if last else ids, chars=len(block))
    buffer.clear()
