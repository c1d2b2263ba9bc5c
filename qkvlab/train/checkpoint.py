"""Checkpoints: complete or absent, verified before anything is loaded.

A checkpoint is a directory ``checkpoints/step_<n>/`` holding

- ``model.safetensors``: the weights (tied tensors stored once; the model config in the metadata),
- ``state.pt``: optimizer, scheduler, RNG states, step, config, version (tensors and plain values only),
- ``manifest.json``: the sha256 and size of both files, written last.

It is assembled in a hidden temporary directory and renamed into place, so a killed writer
leaves no ``step_<n>`` behind. Loading checks the manifest first and refuses a checkpoint whose
files are missing, truncated or altered.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qkvlab.errors import QkvlabError
from qkvlab.atomic import atomic_dir, sha256_file

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
STATE = "state.pt"
MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"^step_(\d+)$")


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


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
    """Write a model state dict as safetensors (tied tensors once, aliases in the metadata)."""
    unique, aliases = _dedupe(state)
    meta = dict(metadata or {})
    meta["qkvlab.aliases"] = json.dumps(aliases)
    save_file(unique, str(path), metadata=meta)
    return Path(path)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A model state dict from `save_weights` (aliases restored as shared tensors)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    state = load_file(str(path))
    for alias, owner in json.loads(meta.get("qkvlab.aliases", "{}")).items():
        state[alias] = state[owner]
    return state


def weights_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def save_checkpoint(ckpt_dir: str | Path, model_state: dict[str, torch.Tensor], state: dict,
                    metadata: dict[str, str] | None = None) -> Path:
    """Atomically write checkpoint `ckpt_dir` (replacing an older one of the same name)."""
    final = Path(ckpt_dir)
    with atomic_dir(final) as tmp:
        save_weights(tmp / WEIGHTS, model_state, metadata)
        torch.save({**state, "format_version": FORMAT_VERSION}, tmp / STATE)
        files = {}
        for name in (WEIGHTS, STATE):
            _fsync(tmp / name)
            files[name] = {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
        manifest = {"format_version": FORMAT_VERSION, "step": state.get("step"), "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _fsync(tmp / MANIFEST)
    return final


def verify_checkpoint(ckpt_dir: str | Path) -> dict:
    """The manifest of a complete, intact checkpoint; a `QkvlabError` naming the problem otherwise."""
    ckpt_dir = Path(ckpt_dir)
    manifest_path = ckpt_dir / MANIFEST
    if not manifest_path.is_file():
        raise QkvlabError(f"checkpoint {str(ckpt_dir)!r} is incomplete: {MANIFEST} is missing; delete it to resume "
                          "from an earlier checkpoint")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise QkvlabError(f"checkpoint {str(ckpt_dir)!r} is corrupt: unreadable {MANIFEST}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise QkvlabError(f"checkpoint {str(ckpt_dir)!r} has format version {manifest.get('format_version')!r}; "
                          f"this qkvlab reads version {FORMAT_VERSION}")
    for name in (WEIGHTS, STATE):
        path = ckpt_dir / name
        expected = files.get(name, {})
        if not path.is_file():
            raise QkvlabError(f"checkpoint {str(ckpt_dir)!r} is incomplete: {name} is missing")
        if path.stat().st_size != expected.get("bytes"):
            raise QkvlabError(f"checkpoint {str(ckpt_dir)!r} is corrupt: {name} has {path.stat().st_size} bytes, "
                              f"the manifest records {expected.get('bytes')} (truncated?)")
        if sha256_file(path) != expected.get("sha256"):
            raise QkvlabError(f"checkpoint {str(ckpt_dir)!r} is corrupt: {name} does not match its sha256 "
                              "in the manifest")
    return manifest


def load_checkpoint(ckpt_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(model state dict, training state) of a verified checkpoint; nothing is returned from a bad one."""
    ckpt_dir = Path(ckpt_dir)
    verify_checkpoint(ckpt_dir)
    try:
        weights = load_weights(ckpt_dir / WEIGHTS)
        state = torch.load(ckpt_dir / STATE, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError) as err:
        raise QkvlabError(f"checkpoint {str(ckpt_dir)!r} cannot be read: {err}") from None
    return weights, state


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the run's checkpoints, oldest first (temporary directories excluded)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step}"


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and leftovers of interrupted writes."""
    root = Path(run_dir) / "checkpoints"
    for _, path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    if root.is_dir():
        for path in [*root.glob(".*.tmp-*"), *root.glob(".*.old-*")]:
            shutil.rmtree(path, ignore_errors=True)
