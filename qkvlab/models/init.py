"""GPT-2 initialisation in which what two variants share starts identical.

Every weight, and each projection (q, k, v) of a fused attention projection, draws from its own
generator seeded by (seed, name): QKV and Q-K=V built with one seed have the same embeddings, MLPs,
norms, output projections and q and k projections, so a comparison of variants starts from the same
point. Statistics are GPT-2's: N(0, init_std), residual projections scaled by 1/sqrt(2 * n_layers),
zero biases.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from qkvlab.arch import ModelConfig
from qkvlab.nn.attention import Attention

_RESIDUAL = ("attn.proj", "mlp.proj")  # projections back into the residual stream


def draw_seed() -> int:
    """A base seed from PyTorch's global generator, so `torch.manual_seed(s)` then building is reproducible."""
    return int(torch.randint(2 ** 62, (1,), device="cpu").item())


def part_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator for the parameter (or projection) `name`, independent of every other name."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@torch.no_grad()
def normal_(tensor: torch.Tensor, std: float, seed: int, name: str) -> None:
    """Fill `tensor` with N(0, std) drawn from `name`'s generator (on CPU, then copied: device-independent)."""
    if tensor.is_meta:
        return
    values = torch.randn(tensor.shape, generator=part_generator(seed, name), dtype=torch.float32)
    tensor.copy_(values * std)


def init_weights(model: nn.Module, config: ModelConfig, seed: int) -> None:
    """Initialise every Linear, Embedding and Conv2d of `model`; fused attention projections part by part."""
    residual_std = config.init_std / math.sqrt(2 * config.n_layers)
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            for part, (weight, _) in module.projection_weights().items():  # views into attn.qkv.weight
                normal_(weight, config.init_std, seed, f"{name}.{part}.weight")
        elif isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)) and not name.endswith("attn.qkv"):
            std = residual_std if name.endswith(_RESIDUAL) else config.init_std
            normal_(module.weight, std, seed, f"{name}.weight")
        if isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
            nn.init.zeros_(module.bias)
