"""Helpers for the cost tests: small architectures and model building. (A plain module, not conftest,
so test files can import it by a name no other suite uses.)"""

from __future__ import annotations

import torch

from qkvlab.arch import ModelConfig
from qkvlab.models import build_model

# Small architectures of every kind, with 8 heads so GQA-4, GQA-8 and MQA all apply.
SMALL_ARCHS: dict[str, ModelConfig] = {
    "gpt2-style": ModelConfig(n_layers=2, d_model=64, n_heads=8, vocab_size=50, max_seq_len=24),
    "llama-style": ModelConfig(n_layers=2, d_model=64, n_heads=8, vocab_size=50, max_seq_len=24, mlp="swiglu",
                               norm="rmsnorm", bias=False, tie_embeddings=False, positions="rotary"),
    "head-dim": ModelConfig(n_layers=2, d_model=48, n_heads=8, head_dim=4, d_mlp=40, vocab_size=50, max_seq_len=24,
                            bias=False, positions="sinusoidal"),
    "encoder": ModelConfig(n_layers=2, d_model=64, n_heads=8, kind="encoder", vocab_size=50, max_seq_len=24,
                           n_classes=5),
    "encoder-vectors": ModelConfig(n_layers=2, d_model=64, n_heads=8, kind="encoder", input_dim=6, max_seq_len=24,
                                   n_classes=5, positions="none", pair_bias_dim=8),
    "vit": ModelConfig(n_layers=2, d_model=64, n_heads=8, kind="vit", image_size=8, patch_size=4, in_channels=3,
                       max_seq_len=5, n_classes=5),
    "vit-dense": ModelConfig(n_layers=2, d_model=64, n_heads=8, kind="vit", image_size=8, patch_size=4, in_channels=3,
                             max_seq_len=5, n_classes=3, dense_head=True, norm="rmsnorm"),
}


def numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


def build(cfg):
    """Build large configs on the meta device (shapes only, nothing allocated); small ones on CPU,
    which is much faster for them than meta's reference kernels."""
    if cfg.d_model < 256:
        return build_model(cfg)
    with torch.device("meta"):
        return build_model(cfg)


def example_inputs(arch: ModelConfig, batch: int = 2, seq_len: int = 12) -> tuple:
    g = torch.Generator().manual_seed(0)
    if arch.kind == "vit":
        return (torch.randn(batch, arch.in_channels, arch.image_size, arch.image_size, generator=g),)
    if arch.kind == "encoder" and arch.input_dim is not None:
        return (torch.randn(batch, seq_len, arch.input_dim, generator=g),)
    return (torch.randint(0, arch.vocab_size, (batch, seq_len), generator=g),)
