"""Training checkpoints: the weights plus the state a run resumes from, complete or absent, verified.

A checkpoint is a weights directory (`qkvlab.weights`) ``RUN/checkpoints/step_<n>/`` holding
``model.safetensors``, ``state.pt`` (optimizer, scheduler, RNG states, step, config, version:
tensors and plain values only) and ``manifest.json`` listing both, written last. It is
assembled in a hidden temporary directory and renamed into place, so a killed writer leaves no
``step_<n>`` behind; loading verifies the manifest first and refuses a checkpoint whose files
are missing, truncated or altered.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from qkvlab.atomic import atomic_dir
from qkvlab.errors import QkvlabError
from qkvlab.weights import (
    CHECKPOINTS,
    FORMAT_VERSION,
    MANIFEST,
    STATE,
    WEIGHTS,
    list_checkpoints,
    load_weights,
    save_weights,
    verify_checkpoint,
    write_manifest,
)

__all__ = ["FORMAT_VERSION", "MANIFEST", "STATE", "WEIGHTS", "checkpoint_path", "latest_checkpoint",
           "list_checkpoints", "load_checkpoint", "load_weights", "prune_checkpoints", "save_checkpoint",
           "save_weights", "verify_checkpoint"]


def save_checkpoint(ckpt_dir: str | Path, model_state: dict[str, torch.Tensor], state: dict,
                    metadata: dict[str, str] | None = None, files: dict[str, bytes] | None = None) -> Path:
    """Atomically write checkpoint `ckpt_dir` (replacing an older one of the same name); `files` (name:
    content, e.g. the run's tokenizer) are written beside the weights and listed in the manifest."""
    final = Path(ckpt_dir)
    files = files or {}
    with atomic_dir(final) as tmp:
        save_weights(tmp / WEIGHTS, model_state, metadata)
        torch.save({**state, "format_version": FORMAT_VERSION}, tmp / STATE)
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        write_manifest(tmp, (WEIGHTS, STATE, *files), step=state.get("step"))
    return final


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


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step}"


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and leftovers of interrupted writes."""
    root = Path(run_dir) / CHECKPOINTS
    for _, path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    if root.is_dir():
        for path in [*root.glob(".*.tmp-*"), *root.glob(".*.old-*")]:
            shutil.rmtree(path, ignore_errors=True)
