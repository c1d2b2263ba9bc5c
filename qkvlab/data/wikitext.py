"""WikiText-103 from the standard files a user supplies, converted once into a token directory.

Layouts: `wikitext-103/wiki.{train,valid,test}.tokens` (word-tokenized: `<unk>`, ` @-@ `, headings
` = Title = `, blank lines) or `wikitext-103-raw/wiki.{train,valid,test}.raw` (the same text,
untokenized). The splits become `train`, `val` and `test`.

Words: the vocabulary is every distinct whitespace-separated word of the train file, by descending
frequency then alphabetically, with `<unk>` (always kept) and `<eos>`. One `<eos>` ends every
line, blank lines included: the convention of the WikiText word-level language models (PyTorch's
word_language_model, Transformer-XL), so the standard files give a vocabulary of 267,735 and a
split has words + lines tokens. A val or test word outside the vocabulary becomes `<unk>`; `vocab_size`
caps the vocabulary (the rarest train words become `<unk>` too). Subwords: the text (the raw
files preferred) in blocks of about 1 M characters cut at newlines, through a Hugging Face tokenizer.

The result lands in `<cache>/wikitext-103-tokens/<tokenizer>-<layout>-<hash of the input folder>/`,
never in the input folder. Its READY.json records each input file's size and mtime: a changed
file converts again, as does a damaged conversion. `chars` counts each file's characters as read
(newlines included). Files are streamed: only the train vocabulary's counts are held in memory.

The full vocabulary is large for small models: tied embeddings at d_model 128 are 34 M parameters.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qkvlab.atomic import atomic_dir, atomic_write_json
from qkvlab.data.cache import READY, cache_root, problems, read_ready
from qkvlab.data.tokens import TokenWriter
from qkvlab.errors import QkvlabError

try:
    import fcntl
except ImportError:  # not POSIX: conversions are not serialised
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from qkvlab.data.tokenizer import TextTokenizer

UNK, EOS = "<unk>", "<eos>"
STANDARD_VOCAB = 267_735  # the standard train file's distinct words (<unk> among them) and <eos>, as published
LAYOUTS = {"tokens": "wikitext-103", "raw": "wikitext-103-raw"}  # layout (the files' suffix) -> folder
SPLITS = (("train", "train"), ("val", "valid"), ("test", "test"))  # (our split, the file's)
LAYOUT_HELP = ("wikitext-103/ with wiki.train.tokens, wiki.valid.tokens, wiki.test.tokens "
               "(or wikitext-103-raw/ with wiki.train.raw, wiki.valid.raw, wiki.test.raw)")
HOW = "download it yourself and pass data_dir=DIR (qkvlab train task=wikitext-103 data_dir=DIR)"
WORDS = "wikitext-103-word"  # the word-level token directory's tokenizer name
CACHE = "wikitext-103-tokens"
FLUSH_TOKENS = 1 << 20
BLOCK_CHARS = 1 << 20
BATCH_BLOCKS = 8
VERSION = 1  # of the conversion; a new one converts again


@dataclass(frozen=True)
class WikiTextFiles:
    """The three split files of one layout ("tokens" or "raw") in `folder`."""

    folder: Path
    layout: str

    @property
    def files(self) -> dict[str, Path]:
        return {split: self.folder / f"wiki.{stem}.{self.layout}" for split, stem in SPLITS}

    def stamp(self) -> dict[str, dict[str, int]]:
        """Each file's size and modification time: what says the cache is for these files."""
        stats = {path.name: path.stat() for path in self.files.values()}
        return {name: {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns} for name, st in stats.items()}


def find_wikitext(data_dir: str | os.PathLike | None = None,
                  prefer: tuple[str, ...] = ("tokens", "raw")) -> WikiTextFiles:
    """The WikiText-103 files in `data_dir` (default: the cache): the folder itself or its
    `wikitext-103/` (`wikitext-103-raw/`) subfolder, the layouts tried in `prefer` order."""
    base = Path(data_dir).expanduser() if data_dir is not None else cache_root()
    if not base.is_dir():
        problem = "is not a directory" if base.exists() else "does not exist"
        raise QkvlabError(f"WikiText-103 directory {base} {problem}; expected it to hold {LAYOUT_HELP}; {HOW}")
    partial = None
    for layout in prefer:
        for folder in (base, base / LAYOUTS[layout]):
            found = WikiTextFiles(folder, layout)
            present = [path.is_file() for path in found.files.values()]
            if all(present):
                return found
            if any(present) and partial is None:
                partial = found
    if partial is not None:
        missing = next(path.name for path in partial.files.values() if not path.is_file())
        raise QkvlabError(f"WikiText-103 folder {partial.folder} has no {missing}; expected {LAYOUT_HELP}")
    raise QkvlabError(f"WikiText-103 not found in {base}: expected {LAYOUT_HELP}; {HOW}")


def _lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 file, streamed; only "\\n" ends a line."""
    try:
        with open(path, encoding="utf-8", newline="\n") as f:
            yield from f
    except UnicodeDecodeError as err:
        raise QkvlabError(f"{path} is not UTF-8 text ({err.reason}); WikiText files are UTF-8") from None


def _blocks(path: Path) -> Iterator[str]:
    """The text of a UTF-8 file in blocks of about `BLOCK_CHARS` characters, cut after a newline."""
    pending = ""
    try:
        with open(path, encoding="utf-8", newline="\n") as f:
            while chunk := f.read(BLOCK_CHARS):
                pending += chunk
                cut = pending.rfind("\n") + 1
                if cut:
                    yield pending[:cut]
                    pending = pending[cut:]
    except UnicodeDecodeError as err:
        raise QkvlabError(f"{path} is not UTF-8 text ({err.reason}); WikiText files are UTF-8") from None
    if pending:
        yield pending


def word_vocab(train: Path, vocab_size: int | None = None) -> list[str]:
    """The train file's words with `<unk>` and `<eos>` (one per line), by descending count then
    alphabetically; with `vocab_size`, only that many, the rarest words counted as `<unk>`."""
    counts: Counter[str] = Counter()
    lines = 0
    for line in _lines(train):
        counts.update(line.split())
        lines += 1
    counts[EOS] += lines
    counts[UNK] += 0
    if vocab_size is not None and len(counts) > vocab_size:
        words = sorted((w for w in counts if w not in (UNK, EOS)), key=lambda w: (-counts[w], w))
        specials = {EOS: counts[EOS], UNK: counts[UNK] + sum(counts[w] for w in words[vocab_size - 2:])}
        counts = Counter({w: counts[w] for w in words[:vocab_size - 2]} | specials)
    return sorted(counts, key=lambda w: (-counts[w], w))


def _write_words(writer: TokenWriter, split: str, path: Path, index: dict[str, int]) -> dict[str, int]:
    """Append `path`'s words and one `<eos>` per line to `split`; its word, line and `<unk>` counts."""
    unk, eos, get = index[UNK], index[EOS], index.get
    ids: list[int] = []
    counts = {"words": 0, "lines": 0, "unk": 0}
    chars = 0

    def flush() -> None:
        nonlocal ids, chars
        array = np.asarray(ids, dtype=np.int64)
        counts["unk"] += int(np.count_nonzero(array == unk))
        writer.write(split, array, chars=chars)
        ids, chars = [], 0

    for line in _lines(path):
        words = line.split()
        ids += [get(w, unk) for w in words]
        ids.append(eos)
        counts["words"] += len(words)
        counts["lines"] += 1
        chars += len(line)
        if len(ids) >= FLUSH_TOKENS:
            flush()
    flush()
    return counts


def _convert_words(found: WikiTextFiles, out: Path, vocab_size: int | None) -> dict:
    vocab = word_vocab(found.files["train"], vocab_size)
    index = {w: i for i, w in enumerate(vocab)}
    writer = TokenWriter(out, len(vocab), WORDS, eot=index[EOS])
    counts = {split: _write_words(writer, split, path, index) for split, path in found.files.items()}
    for key in ("words", "lines", "unk"):
        writer.meta[key] = {split: c[key] for split, c in counts.items()}
    meta = writer.close()
    (out / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")  # what `qkvlab generate` decodes with
    return {"vocab_size": len(vocab), **{key: meta[key] for key in ("words", "lines", "unk", "chars")}}


def _convert_subwords(found: WikiTextFiles, out: Path, tokenizer: TextTokenizer) -> dict:
    from qkvlab.data.tokenizer import tokenizer_files

    writer = TokenWriter(out, tokenizer.vocab_size, tokenizer.name, eot=tokenizer.eot)
    for split, path in found.files.items():
        batch: list[str] = []
        for block in _blocks(path):
            batch.append(block)
            if len(batch) >= BATCH_BLOCKS:
                _encode(writer, split, batch, tokenizer)
        _encode(writer, split, batch, tokenizer)
    meta = writer.close()
    for name, data in tokenizer_files(tokenizer)[1].items():  # tokenizer.json: the directory knows its tokenizer
        (out / name).write_bytes(data)
    tokens = {split: sum(s["tokens"] for s in shards) for split, shards in meta["splits"].items()}
    return {"vocab_size": tokenizer.vocab_size, "tokens": tokens, "chars": meta["chars"]}


def _encode(writer: TokenWriter, split: str, batch: list[str], tokenizer: TextTokenizer) -> None:
    if batch:
        for block, ids in zip(batch, tokenizer.encode_batch(batch), strict=True):
            writer.write(split, ids, chars=len(block))
        batch.clear()


def _fresh(out: Path, record: dict) -> bool:
    """Whether `out` is a complete conversion of the inputs `record` describes (else it is redone)."""
    if not (out / READY).is_file():
        return False
    try:
        ready = read_ready(out)
    except QkvlabError:
        return False
    return all(ready.get(k) == v for k, v in record.items()) and not problems(out)


@contextlib.contextmanager
def _converting(out: Path) -> Iterator[None]:
    """One process converts into `out` at a time; the others wait here, then reuse its result."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _has_words(path: Path) -> bool:
    return any(line.split() for line in _lines(path))


def wikitext_tokens(data_dir: str | os.PathLike | None = None, tokenizer: TextTokenizer | None = None,
                    vocab_size: int | None = None, cache: str | os.PathLike | None = None) -> Path:
    """The token directory of the WikiText-103 files in `data_dir`, converted into the cache on first use.

    Words without `tokenizer` (the tokenized files preferred; `vocab_size` caps the vocabulary),
    else `tokenizer`'s ids (the raw files preferred). `cache` is the cache root (default: $QKVLAB_DATA).
    """
    if vocab_size is not None:
        if tokenizer is not None:
            raise QkvlabError("vocab_size caps the word vocabulary; a subword tokenizer has its own size")
        if type(vocab_size) is not int or vocab_size < 2:
            raise QkvlabError(f"vocab_size must be an integer >= 2 (<unk> and <eos>), got {vocab_size!r}")
    found = find_wikitext(data_dir, ("tokens", "raw") if tokenizer is None else ("raw", "tokens"))
    folder = found.folder.resolve()
    if tokenizer is None:
        name, files = "words", {}
    else:
        from qkvlab.data.tokenizer import tokenizer_files

        name, files = tokenizer.name, tokenizer_files(tokenizer)[0]["files"]
    key = hashlib.sha256(f"{folder}\n{found.layout}".encode()).hexdigest()[:16]
    cap = f"-v{vocab_size}" if vocab_size is not None else ""
    out = cache_root(cache) / CACHE / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}-{found.layout}-{key}{cap}"
    if folder == out.resolve() or folder in out.resolve().parents:
        raise QkvlabError(f"the cache {out} lies inside the WikiText-103 folder {folder}; "
                          "set QKVLAB_DATA to a directory outside it")
    record = {"version": VERSION, "source": str(folder), "layout": found.layout, "tokenizer": name,
              "tokenizer_files": files, "vocab_cap": vocab_size, "inputs": found.stamp()}
    if _fresh(out, record):
        return out
    for split, path in found.files.items():
        if not _has_words(path):
            raise QkvlabError(f"{path} holds no words: the {split} split would be empty; expected {LAYOUT_HELP}")
    with _converting(out):
        if _fresh(out, record):  # another process converted it while this one waited
            return out
        with atomic_dir(out) as tmp:
            info = (_convert_words(found, tmp, vocab_size) if tokenizer is None
                    else _convert_subwords(found, tmp, tokenizer))
            atomic_write_json(tmp / READY, {**record, "info": info})
    return out
