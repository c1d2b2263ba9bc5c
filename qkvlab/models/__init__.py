"""Models built from a `ModelConfig`: `build_model(config, seed)`."""

from torch import nn

from qkvlab.arch import PRESETS, ModelConfig, preset
from qkvlab.models.encoder import Encoder
from qkvlab.models.gpt import GPT
from qkvlab.models.vit import ViT

_KINDS = {"decoder": GPT, "encoder": Encoder, "vit": ViT}


def build_model(config: ModelConfig, seed: int | None = None) -> nn.Module:
    """The model of `config.kind` ("decoder", "encoder" or "vit"), initialised from `seed`.

    Without a seed, one is drawn from PyTorch's global generator (`torch.manual_seed` first for
    reproducibility). Variants built with the same seed start with identical shared weights.
    """
    return _KINDS[config.kind](config, seed)


__all__ = ["GPT", "Encoder", "ViT", "ModelConfig", "PRESETS", "preset", "build_model"]
