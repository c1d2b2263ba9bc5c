"""The tokenizer a saved model records (`qkvlab.data.tokenizer` builds and reads the record; this
module finds it with the weights): an export, a checkpoint, a run's newest checkpoint or a converted
model hold the tokenizer's files beside their weights and a record of them in the weights' metadata."""

from __future__ import annotations

import json
import os

from qkvlab.data.tokenizer import TOKENIZER_KEY, Tok, describe, load_tokenizer, same_tokenizer, tokenizer_from_record
from qkvlab.errors import QkvlabError
from qkvlab.weights import read_metadata, weights_file

__all__ = ["model_tokenizer", "recorded_tokenizer", "run_tokenizer"]


def recorded_tokenizer(model_path: str | os.PathLike) -> Tok | None:
    """The tokenizer recorded with the saved model at `model_path` (an export, checkpoint or run
    directory, or the weights file), or None when the model records none (saved before records existed,
    or trained on data whose tokenizer was not known)."""
    file = weights_file(os.fspath(model_path))
    raw = read_metadata(file).get(TOKENIZER_KEY)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        raise QkvlabError(f"{file}: the recorded tokenizer is not valid JSON") from None
    return tokenizer_from_record(record, file.parent)


def model_tokenizer(model_path: str | os.PathLike, given: str | None) -> Tok | None:
    """The tokenizer to use with the saved model at `model_path`: the recorded one, or `given` (a
    `load_tokenizer` name), which must then be the recorded one; None when neither exists."""
    recorded = recorded_tokenizer(model_path)
    if given is None:
        return recorded
    tok = load_tokenizer(given)
    if recorded is not None and not same_tokenizer(tok, recorded):
        raise QkvlabError(f"--tokenizer {given} ({tok.vocab_size:,} tokens) is not the tokenizer {model_path} was "
                          f"trained with, {describe(recorded)}; leave out --tokenizer to use the recorded one")
    return tok


def run_tokenizer(task, init_from: str | os.PathLike | None = None) -> Tok | None:
    """The tokenizer a run's saved models record: its task's (`task.tokenizer()`, language tasks), else
    the one `init_from` records. A task and an `init_from` with different tokenizers are refused."""
    known = getattr(task, "tokenizer", None)
    tok = known() if callable(known) else None
    if init_from is not None:
        recorded = recorded_tokenizer(init_from)
        if tok is not None and recorded is not None and not same_tokenizer(tok, recorded):
            raise QkvlabError(f"init_from {init_from} was trained with tokenizer {describe(recorded)}, but task "
                              f"{getattr(task, 'name', '?')!r} reads {describe(tok)}")
        tok = tok or recorded
    return tok
