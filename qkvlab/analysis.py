"""Why K = V works: how similar a trained model's queries, keys and values are.

For every layer: the mean cosine similarity between per-head query, key and value vectors
of the same token (keys/values expanded to the query heads), and the effective rank
(exp of the entropy of the normalised singular values, Roy & Vetterli 2007) of each
projection's weight and of its outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qkvlab.nn.attention import Attention


def effective_rank(matrix: torch.Tensor) -> float:
    """exp(H(p)) with p the singular values of `matrix` (2D) normalised to sum 1."""
    s = torch.linalg.svdvals(matrix.double())
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def _mean_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).mean())


@torch.no_grad()
def layer_similarity(attn: Attention, x: torch.Tensor) -> dict[str, float]:
    """Similarity statistics of one attention layer on its inputs x (B, T, C)."""
    q, k, v = attn.project(x)  # (B, H, T, D), (B, H_kv, T, D), (B, H_kv, T, D) or None
    v = k if v is None else v
    rep = attn.n_heads // attn.n_kv_heads
    k_full, v_full = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, T, D)
    flat = {name: t.transpose(1, 2).flatten(2).flatten(0, 1)  # (B*T, heads*D)
            for name, t in (("q", q), ("k", k), ("v", v))}
    stats = {"cos_qk": _mean_cos(q, k_full), "cos_qv": _mean_cos(q, v_full), "cos_kv": _mean_cos(k_full, v_full)}
    for name, t in flat.items():
        stats[f"rank_{name}"] = effective_rank(t)
    for name, (w, _) in attn.projection_weights().items():
        stats[f"weight_rank_{name}"] = effective_rank(w)
    return stats


@torch.no_grad()
def projection_similarity(model: nn.Module, *inputs, **kwargs) -> list[dict[str, float]]:
    """Per-layer statistics of `model` run on `inputs` (the attention inputs are captured by hooks)."""
    captured: list[tuple[Attention, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: captured.append((mod, args[0])))
             for m in model.modules() if isinstance(m, Attention)]
    was_training = model.training
    try:
        model.eval()
        model(*inputs, **kwargs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [{"layer": attn.layer_idx, **layer_similarity(attn, x)} for attn, x in captured]
