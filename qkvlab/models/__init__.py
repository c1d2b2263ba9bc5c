"""Models built from a `ModelConfig`: `build_model(config, seed)`."""

from qkvlab.arch import PRESETS, ModelConfig, preset
from qkvlab.models.encoder import Encoder
from qkvlab.models.gpt import GPT
from qkvlab.models.vit import ViT

Model = GPT | Encoder | ViT  # a qkvlab model: each has a `.config` (ModelConfig)

_KINDS: dict[str, type[Model]] = {"decoder": GPT, "encoder": Encoder, "vit": ViT}


def build_model(config: ModelConfig, seed: int | None = None) -> Model:
    """The model of `config.kind` ("decoder", "encoder" or "vit"), initialised from `seed`.

    Without a seed, one is drawn from PyTorch's global generator (`torch.manual_seed` first for
    reproducibility). Variants built with the same seed start with identical shared weights.
    """
    return _KINDS[config.kind](config, seed)


__all__ = ["GPT", "Encoder", "ViT", "Model", "ModelConfig", "PRESETS", "preset", "build_model"]
