"""Save and load models as safetensors with their config, from an export, a checkpoint or a run.

An exported model is a directory with `model.safetensors` (the config in its metadata under
"qkvlab.model_config", tied weights stored once) and a readable `config.json`. Training
checkpoints (`RUN/checkpoints/step_<n>/`) use the same weights file, so `load_model` accepts
an export directory, a checkpoint directory, a run directory (its newest checkpoint) or the
`.safetensors` file itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as _load_into
from safetensors.torch import save_model as _save_from
from torch import nn

from qkvlab.atomic import atomic_dir
from qkvlab.errors import QkvlabError
from qkvlab.models import build_model
from qkvlab.models.config import ModelConfig

WEIGHTS = "model.safetensors"
CONFIG_KEY = "qkvlab.model_config"
_STEP = re.compile(r"^step_(\d+)$")


def save_model(model: nn.Module, out_dir: str | Path) -> Path:
    """Write `model` (which has a `.config`) to `out_dir` atomically: complete or absent."""
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        config = json.dumps(model.config.to_dict())
        _save_from(model, str(tmp / WEIGHTS), metadata={CONFIG_KEY: config})
        (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    return out


def weights_file(path: str | Path) -> Path:
    """The weights file behind an export, checkpoint or run directory (or the file itself)."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / WEIGHTS).is_file():
        return path / WEIGHTS
    steps = sorted((int(m.group(1)), p) for p in (path / "checkpoints").glob("step_*")
                   if (m := _STEP.match(p.name)) and (p / WEIGHTS).is_file())
    if steps:
        return steps[-1][1] / WEIGHTS
    raise QkvlabError(f"no model at {str(path)!r}: expected a {WEIGHTS} file, an export or checkpoint directory "
                      "holding one, or a run directory with checkpoints/step_<n>/")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model saved at `path`, in eval mode, on `device`."""
    file = weights_file(path)
    if file.parent.joinpath("manifest.json").is_file() or file.parent.joinpath("state.pt").is_file():
        from qkvlab.train.checkpoint import verify_checkpoint

        verify_checkpoint(file.parent)
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise QkvlabError(f"cannot read {str(file)!r}: {err}") from None
    if CONFIG_KEY not in meta:
        raise QkvlabError(f"{str(file)!r} has no qkvlab model config in its metadata (not saved by qkvlab?)")
    try:
        model = build_model(ModelConfig(**json.loads(meta[CONFIG_KEY])))
        missing, unexpected = _load_into(model, str(file), strict=False)
    except (ValueError, TypeError, RuntimeError, SafetensorError) as err:
        raise QkvlabError(f"{str(file)!r} holds an unusable model: {err}") from None
    if missing or unexpected:
        raise QkvlabError(f"{str(file)!r} does not match its config: missing {sorted(missing)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]}")
    return model.to(device).eval()
