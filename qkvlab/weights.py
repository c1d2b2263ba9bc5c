"""Weights on disk: one safetensors file, a manifest that proves it intact, and where to find it.

A weights directory (an export, or a training checkpoint ``RUN/checkpoints/step_<n>/``) holds

- ``model.safetensors``: a state dict with tied tensors stored once (their other names listed in
  the metadata under "qkvlab.aliases") and the model config under "qkvlab.model_config";
- ``state.pt`` in a checkpoint only: the training state (`qkvlab.train.checkpoint` writes it);
- ``manifest.json``, written last: the sha256 and size of the files above. `verify_weights`
  refuses a directory whose files are missing, truncated or altered, naming the file, before
  anything is read; a checkpoint without a manifest is refused too.

Writers assemble a directory with `qkvlab.atomic.atomic_dir`, so it is complete or absent.
`weights_file` finds the weights of an export, a checkpoint, a run (its newest checkpoint) or
the file itself. This module knows nothing of models or training; `qkvlab.models.io` and
`qkvlab.train.checkpoint` build on it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as _load_model
from torch import nn

from qkvlab.atomic import sha256_file
from qkvlab.errors import QkvlabError

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
STATE = "state.pt"  # a training checkpoint's optimizer, scheduler and RNG state (qkvlab.train.checkpoint)
CONFIG_KEY = "qkvlab.model_config"
ALIASES_KEY = "qkvlab.aliases"
CHECKPOINTS = "checkpoints"  # a run directory's checkpoints: CHECKPOINTS/step_<n>/
_STEP = re.compile(r"^step_(\d+)$")


# --- the weights file ------------------------------------------------------------------

def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors stored once: tied weights (same storage, shape and stride) become aliases of the first name."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    owners: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for name, tensor in state.items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
               tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if key in owners and tensor.numel() > 0:
            aliases[name] = owners[key]
        else:
            owners[key] = name
            storage = key[:2]
            tensor = tensor.detach().to("cpu")
            # safetensors refuses overlapping tensors: a view of a stored storage is copied.
            unique[name] = tensor.clone() if storage in storages else tensor.contiguous()
            storages.add(storage)
    return unique, aliases


def save_weights(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write a state dict as safetensors (tied tensors once, aliases in the metadata)."""
    unique, aliases = _dedupe(state)
    save_file(unique, str(path), metadata={**(metadata or {}), ALIASES_KEY: json.dumps(aliases)})
    return Path(path)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file; a one-line `QkvlabError` when it cannot be read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise QkvlabError(f"cannot read {str(path)!r}: {err}") from None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict `save_weights` wrote (aliases restored as the same tensor)."""
    state = load_file(str(path))
    for alias, owner in json.loads(read_metadata(path).get(ALIASES_KEY, "{}")).items():
        state[alias] = state[owner]
    return state


def load_into(module: nn.Module, path: str | Path) -> None:
    """Load the weights file into `module`, which must have exactly its parameters and buffers
    (names tied in `module` may be stored once); a `QkvlabError` naming the mismatch otherwise."""
    try:
        missing, unexpected = _load_model(module, str(path), strict=False)
    except (ValueError, TypeError, RuntimeError, SafetensorError) as err:
        raise QkvlabError(f"{str(path)!r} holds unusable weights: {err}") from None
    if missing or unexpected:
        raise QkvlabError(f"{str(path)!r} does not match its config: missing {sorted(missing)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]}")


# --- the manifest ----------------------------------------------------------------------

def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_manifest(directory: str | Path, files: Iterable[str], **fields) -> dict:
    """Flush `files` of `directory` to disk, then record their sha256 and size (and `fields`) in
    its manifest, itself flushed: the manifest exists only once what it lists is on disk."""
    directory = Path(directory)
    entries = {}
    for name in files:
        _fsync(directory / name)
        entries[name] = {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
    manifest = {"format_version": FORMAT_VERSION, **fields, "files": entries}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _fsync(directory / MANIFEST)
    return manifest


def _check(directory: Path, required: tuple[str, ...], what: str, missing_hint: str = "") -> dict:
    """The manifest of `directory` once every `required` file and every file it lists matches it."""
    label = f"{what} {str(directory)!r}"
    if not (directory / MANIFEST).is_file():
        raise QkvlabError(f"{label} is incomplete: {MANIFEST} is missing{missing_hint}")
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = dict(manifest["files"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise QkvlabError(f"{label} is corrupt: unreadable {MANIFEST}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise QkvlabError(f"{label} has format version {manifest.get('format_version')!r}; "
                          f"this qkvlab reads version {FORMAT_VERSION}")
    for name in dict.fromkeys([*required, *files]):
        path, expected = directory / name, files.get(name)
        if not isinstance(expected, dict):
            raise QkvlabError(f"{label} is corrupt: {MANIFEST} does not record {name}")
        if not path.is_file():
            raise QkvlabError(f"{label} is incomplete: {name} is missing")
        if path.stat().st_size != expected.get("bytes"):
            raise QkvlabError(f"{label} is corrupt: {name} has {path.stat().st_size} bytes, "
                              f"the manifest records {expected.get('bytes')} (truncated?)")
        if sha256_file(path) != expected.get("sha256"):
            raise QkvlabError(f"{label} is corrupt: {name} does not match its sha256 in the manifest")
    return manifest


def verify_checkpoint(ckpt_dir: str | Path) -> dict:
    """The manifest of a complete, intact checkpoint (weights and state); a `QkvlabError` naming the problem."""
    return _check(Path(ckpt_dir), (WEIGHTS, STATE), "checkpoint",
                  "; delete it to resume from an earlier checkpoint")


def verify_weights(directory: str | Path) -> dict | None:
    """Verify a weights directory before it is read: a checkpoint (it holds a training state) as
    `verify_checkpoint`; an export against its manifest. None for an export written before
    exports had manifests (nothing to check)."""
    directory = Path(directory)
    if (directory / STATE).is_file():
        return verify_checkpoint(directory)
    if (directory / MANIFEST).is_file():
        return _check(directory, (WEIGHTS,), "model")
    return None


# --- where weights are -----------------------------------------------------------------

def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of a run's checkpoint directories, oldest first (temporary directories excluded)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP.match(p.name)))


def weights_file(path: str | Path) -> Path:
    """The weights file behind an export, checkpoint or run directory (or the file itself)."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / WEIGHTS).is_file():
        return path / WEIGHTS
    found = [p / WEIGHTS for _, p in list_checkpoints(path) if (p / WEIGHTS).is_file()]
    if found:
        return found[-1]
    raise QkvlabError(f"no model at {str(path)!r}: expected a {WEIGHTS} file, an export or checkpoint directory "
                      f"holding one, or a run directory with {CHECKPOINTS}/step_<n>/")
