"""Save and load models: an export, a training checkpoint or a run, as one `nn.Module` with its config.

An export is a weights directory (`qkvlab.weights`): `model.safetensors` (the config in its
metadata, tied weights stored once), `manifest.json`, and a readable `config.json`. Training
checkpoints (`RUN/checkpoints/step_<n>/`) use the same weights file, so `load_model` accepts an
export directory, a checkpoint directory, a run directory (its newest checkpoint) or the
`.safetensors` file itself, and verifies the directory's manifest before reading anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qkvlab.atomic import atomic_dir
from qkvlab.errors import QkvlabError
from qkvlab.models import Model, build_model
from qkvlab.models.config import ModelConfig
from qkvlab.weights import (
    CONFIG_KEY,
    WEIGHTS,
    load_into,
    read_metadata,
    save_weights,
    verify_weights,
    weights_file,
    write_manifest,
)

__all__ = ["CONFIG_KEY", "WEIGHTS", "load_model", "save_model", "saved_model_config", "weights_file"]


def save_model(model: Model, out_dir: str | Path, tokenizer=None) -> Path:
    """Write `model` (which has a `.config`) to `out_dir` atomically: complete or absent. `tokenizer`
    (a `qkvlab.data.tokenizer` tokenizer) is recorded: its files beside the weights, a record in their metadata."""
    from qkvlab.data.tokenizer import tokenizer_metadata

    out = Path(out_dir)
    config = model.config.to_dict()
    tok_meta, tok_files = tokenizer_metadata(tokenizer)
    with atomic_dir(out) as tmp:
        save_weights(tmp / WEIGHTS, model.state_dict(), {CONFIG_KEY: json.dumps(config), **tok_meta})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name, data in tok_files.items():
            (tmp / name).write_bytes(data)
        write_manifest(tmp, (WEIGHTS, *tok_files))
    return out


def saved_model_config(path: str | Path) -> ModelConfig:
    """The ModelConfig stored with saved weights (an export, checkpoint or run directory, or the file)."""
    file = weights_file(path)
    meta = read_metadata(file)
    if CONFIG_KEY not in meta:
        raise QkvlabError(f"{str(file)!r} has no qkvlab model config in its metadata (not saved by qkvlab?)")
    try:
        return ModelConfig(**json.loads(meta[CONFIG_KEY]))
    except (ValueError, TypeError) as err:
        raise QkvlabError(f"{str(file)!r} holds an unusable model config: {err}") from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> Model:
    """The model saved at `path`, in eval mode, on `device` (its directory's manifest verified first)."""
    file = weights_file(path)
    verify_weights(file.parent)
    model = build_model(saved_model_config(file))
    load_into(model, file)
    return model.to(device).eval()
