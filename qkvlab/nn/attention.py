"""One attention module for every projection-sharing variant.

It learns only the projections the variant needs, fused into one matmul:
QKV [q | k | v], Q-K=V [q | kv], Q=K-V [qk | v], Q=K=V [qkv], Q=X [k | v] (the query is the
input itself). Attention runs through `scaled_dot_product_attention` with grouped heads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from qkvlab.nn.kv_cache import KVCache
from qkvlab.nn.positions import PairBias, Rotary, apply_rotary

if TYPE_CHECKING:
    from qkvlab.models.config import ModelConfig


@dataclass
class AttentionContext:
    """What every layer of one forward pass shares, computed once by the model."""

    q_pos: torch.Tensor  # (B, T) absolute positions of the inputs
    k_len: int  # keys each query reads (T, or the cache length after writing)
    causal: bool
    is_causal: bool  # SDPA's fast causal path applies (no cache offset, no extra mask)
    mask: torch.Tensor | None = None  # (B, 1, T, Tk) bool, True = attend
    cache: KVCache | None = None
    rotary: Rotary | None = None

    @cached_property
    def k_pos(self) -> torch.Tensor:
        return torch.arange(self.k_len, device=self.q_pos.device)  # (Tk,)

    @cached_property
    def q_rotation(self) -> torch.Tensor:
        """Rotations of the query positions, (B, 1, T, D/2): computed once, used by every layer."""
        return self.rotary.tables(self.q_pos)

    @cached_property
    def k_rotation(self) -> torch.Tensor:
        """Rotations of every key position, (Tk, D/2), for keys rotated when read (K = V)."""
        return self.rotary.tables(self.k_pos)


class Attention(nn.Module):
    """Multi-head attention whose Q, K, V projections are tied as `config.spec` says."""

    def __init__(self, config: ModelConfig, layer_idx: int = 0):
        super().__init__()
        spec = config.spec
        self.spec, self.layer_idx = spec, layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.resolved_head_dim
        kv_width = self.n_kv_heads * self.head_dim
        self.widths = {
            "q": self.n_heads * self.head_dim if spec.has_q_proj else 0,
            "k": kv_width,
            "v": kv_width if spec.has_v_proj else 0,
        }
        self.qkv = nn.Linear(config.d_model, sum(self.widths.values()), bias=config.bias)
        self.proj = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=config.bias)
        self.pair_bias = PairBias(config.max_seq_len, config.pair_bias_dim) if spec.pair_bias else None
        self.attn_dropout = config.attn_dropout

    def _heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = t.shape
        return t.view(B, T, n, self.head_dim).transpose(1, 2)  # (B, n, T, D)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Query (B, H, T, D), key (B, H_kv, T, D) and value (None when V = K), before rotation."""
        q, k, v = self.qkv(x).split(list(self.widths.values()), dim=-1)  # (B, T, width) each
        k = self._heads(k, self.n_kv_heads)
        if self.spec.q_source == "q":
            q = self._heads(q, self.n_heads)
        elif self.spec.q_source == "k":
            q = k
        else:
            q = self._heads(x, self.n_heads)
        return q, k, (self._heads(v, self.n_kv_heads) if self.spec.has_v_proj else None)

    def projection_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """(weight (out, in), bias) of each projection the layer learns, keyed "q", "k", "v"."""
        widths = list(self.widths.values())
        weights = self.qkv.weight.split(widths, dim=0)
        biases = self.qkv.bias.split(widths, dim=0) if self.qkv.bias is not None else [None] * 3
        return {name: (w, b) for name, w, b, width in zip(self.widths, weights, biases, widths) if width}

    def forward(self, x: torch.Tensor, ctx: AttentionContext, need_weights: bool = False):
        """x (B, T, C) -> (B, T, C); with `need_weights`, also {"scores", "probs"} (B, H, T, Tk)."""
        q, k, v = self.project(x)
        rotary = ctx.rotary
        if rotary is not None:
            q = apply_rotary(q, ctx.q_rotation)
            if v is not None:  # separate V: keys are stored rotated
                k = apply_rotary(k, ctx.q_rotation)
        if ctx.cache is not None:
            ctx.cache.write(self.layer_idx, ctx.q_pos, *([k] if v is None else [k, v]))
            stored = [t.to(q.dtype) for t in ctx.cache.read(self.layer_idx, ctx.k_len)]  # (B, H_kv, Tk, D) each
            k, v = (stored[0], None) if v is None else stored
        if v is None:  # K = V: one stored tensor; keys are rotated when read, values never
            v = k
            if rotary is not None:
                reuse = ctx.cache is not None and not torch.is_grad_enabled()
                workspace = ctx.cache.rotation_workspace(ctx.k_len) if reuse else None
                k = apply_rotary(k, ctx.k_rotation, out=workspace)  # (B, H_kv, Tk, D)
        bias = None
        if self.pair_bias is not None:
            q = q * self.pair_bias.score_scale()
            bias = self.pair_bias(ctx.q_pos, ctx.k_pos).to(q.dtype)  # (B, 1, T, Tk)
        weights = None
        if need_weights:
            y, weights = self._explicit(q, k, v, bias, ctx)
        else:
            mask, is_causal = ctx.mask, ctx.is_causal
            if bias is not None:
                if mask is None and is_causal:
                    mask = causal_mask(q.shape[-2], k.shape[-2], q.device)
                mask, is_causal = (bias if mask is None else bias.masked_fill(~mask, float("-inf"))), False
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal,
                dropout_p=self.attn_dropout if self.training else 0.0,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )  # (B, H, T, D)
        B, _, T, _ = y.shape
        y = self.proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        return (y, weights) if need_weights else y

    def _explicit(self, q, k, v, bias, ctx: AttentionContext):
        """Attention keeping the score (before masking) and probability matrices, for analysis."""
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, Tk, D)
        scores = q @ k.transpose(-2, -1) * self.head_dim ** -0.5  # (B, H, T, Tk)
        if bias is not None:
            scores = scores + bias
        mask = ctx.mask
        if mask is None and ctx.is_causal:
            mask = causal_mask(scores.shape[-2], scores.shape[-1], q.device)
        logits = scores if mask is None else scores.masked_fill(~mask, float("-inf"))
        probs = logits.softmax(dim=-1)
        return probs @ v, {"scores": scores, "probs": probs}


def causal_mask(t: int, tk: int, device) -> torch.Tensor:
    """(T, Tk) bool, True where query i (the last T of Tk positions) may attend key j."""
    return torch.ones(t, tk, dtype=torch.bool, device=device).tril(tk - t)
