"""The transformer block: pre-norm attention and MLP with GPT-2's dropout placement."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qkvlab.arch import ModelConfig
from qkvlab.nn.attention import Attention, AttentionContext
from qkvlab.nn.linear import Linear
from qkvlab.nn.positions import PairBias, Rotary


def make_norm(config: ModelConfig) -> nn.LayerNorm | nn.RMSNorm:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


class MLP(nn.Module):
    """GELU (exact or GPT-2's tanh form, `config.activation`) or SwiGLU (Llama) feed-forward."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"
        hidden = config.resolved_d_mlp
        self.fc = Linear(config.d_model, (2 if self.swiglu else 1) * hidden, bias=config.bias)
        self.proj = Linear(hidden, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)  # (B, T, hidden or 2*hidden)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate=self.approximate)
        return self.proj(h)  # (B, T, C)


class Block(nn.Module):
    """Pre-norm attention and MLP; the attention gets the model's shared `rotary` and its own pair bias."""

    def __init__(self, config: ModelConfig, layer_idx: int, rotary: Rotary | None = None):
        super().__init__()
        self.norm1, self.norm2 = make_norm(config), make_norm(config)
        pair_bias = PairBias(config.max_seq_len, config.pair_bias_dim) if config.spec.pair_bias else None
        self.attn = Attention(config.d_model, config.n_heads, config.spec, head_dim=config.head_dim,
                              bias=config.bias, causal=config.causal, dropout=config.attn_dropout,
                              rotary=rotary, pair_bias=pair_bias, layer_idx=layer_idx)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, ctx: AttentionContext | None = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), ctx))
        return x + self.dropout(self.mlp(self.norm2(x)))  # (B, T, C)
