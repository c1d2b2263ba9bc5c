"""Bidirectional encoder that labels every position (synthetic tasks, set anomaly)."""

from __future__ import annotations

import torch
from torch import nn

from qkvlab.arch import ModelConfig
from qkvlab.models.backbone import Backbone
from qkvlab.models.init import draw_seed, init_weights


class Encoder(nn.Module):
    """Token ids (B, T) or vectors (B, T, input_dim) -> per-position logits (B, T, n_classes)."""

    def __init__(self, config: ModelConfig, seed: int | None = None):
        super().__init__()
        seed = draw_seed() if seed is None else seed  # before any module draws from the global generator
        self.config = config
        if config.input_dim is None:
            self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        else:
            self.in_proj = nn.Linear(config.input_dim, config.d_model, bias=config.bias)
        self.backbone = Backbone(config)
        self.head = nn.Linear(config.d_model, config.n_classes, bias=config.bias)
        init_weights(self, config, seed)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None, return_attention: bool = False):
        h = self.tok_emb(x) if self.config.input_dim is None else self.in_proj(x)  # (B, T, C)
        out = self.backbone(h, padding_mask=padding_mask, need_weights=return_attention)
        h, weights = out if return_attention else (out, None)
        logits = self.head(h)  # (B, T, n_classes)
        return (logits, weights) if return_attention else logits
