"""Models built from a `ModelConfig`: `build_model(config)`."""

from torch import nn

from qkvlab.models.config import PRESETS, ModelConfig, preset
from qkvlab.models.encoder import Encoder
from qkvlab.models.gpt import GPT
from qkvlab.models.vit import ViT

_KINDS = {"decoder": GPT, "encoder": Encoder, "vit": ViT}


def build_model(config: ModelConfig) -> nn.Module:
    """The model of `config.kind` ("decoder", "encoder" or "vit")."""
    return _KINDS[config.kind](config)


__all__ = ["GPT", "Encoder", "ViT", "ModelConfig", "PRESETS", "preset", "build_model"]
