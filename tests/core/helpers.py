"""Shared helpers for the core tests: small configs, random weights, variant grids."""

from __future__ import annotations

import torch
from torch import nn

from qkvlab.models import ModelConfig, build_model
from qkvlab.variants import PAPER_VARIANTS, parse_variant

ATOL = 1e-5

# Projection forms whose query is not the key, so they can share key/value heads.
GROUPABLE = ("QKV", "Q-K=V", "Q=X", "Q=X-K=V")


def small(kind: str = "decoder", **kw) -> ModelConfig:
    """A small model: 2 layers, d_model 64, 8 heads of 8 dims, float32."""
    base = dict(kind=kind, n_layers=2, d_model=64, n_heads=8, max_seq_len=32, vocab_size=50, n_classes=7)
    base.update(kw)
    return ModelConfig(**base)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Replace the tiny default init by weights that make attention peaked and biases non-zero.

    Matrices get N(0, 1/fan_in), biases N(0, 0.1^2), norm gains 1 + N(0, 0.1^2), so a wrong
    mask, position or tied tensor shows up well above float32 rounding.
    """
    g = torch.Generator().manual_seed(seed)
    norms = {id(m.weight) for m in model.modules()
             if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and m.weight is not None}
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if id(p) in norms:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("pair_bias.weight"):
                p.copy_(1.0 / p.numel() + 0.1 * noise)
            elif p.dim() >= 2 or name.endswith("cls_token"):
                fan_in = p[0].numel() if p.dim() >= 2 else p.numel()
                p.copy_(noise / fan_in ** 0.5)
            else:
                p.copy_(0.1 * noise)
    return model


def make(config: ModelConfig, seed: int = 0) -> nn.Module:
    """`build_model(config)` with random weights, in eval mode."""
    torch.manual_seed(seed)
    return randomize_(build_model(config), seed).eval()


def variant_grid(plus: bool = True) -> list[str]:
    """Every paper variant, plus every groupable projection with MHA, GQA-2, GQA-4 and MQA
    (8 query heads), plus "+" versions; canonical names, no duplicates."""
    names = list(PAPER_VARIANTS) + ["Q=X/GQA-2", "Q=X-K=V"]
    for proj in GROUPABLE:
        names += [proj] + [f"{proj}/{h}" for h in ("GQA-2", "GQA-4", "MQA")]
    if plus:
        names += ["QKV+", "Q-GQA-2+", "Q=X-K=V+"]
    else:
        names = [n for n in names if not n.endswith("+")]
    seen: dict[str, None] = {}
    for n in names:
        seen.setdefault(parse_variant(n).name, None)
    return list(seen)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def full_and_steps(model: nn.Module, x: torch.Tensor, prefill: int, **cache_kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of the full forward over x[:, prefill:], the same positions decoded one token at a time after a
    prefill of x[:, :prefill] into `model.make_cache(B, T, **cache_kw)`), both (B, T - prefill, V)."""
    B, T = x.shape
    with torch.no_grad():
        full = model(x)
        cache = model.make_cache(B, T, **cache_kw)
        model(x[:, :prefill], cache)
        steps = torch.cat([model(x[:, i:i + 1], cache) for i in range(prefill, T)], dim=1)
    return full[:, prefill:], steps
