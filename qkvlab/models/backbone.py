"""The shared transformer stack: absolute or rotary positions, masks, blocks, final norm."""

from __future__ import annotations

import math

import torch
from torch import nn

from qkvlab.errors import QkvlabError
from qkvlab.models.config import ModelConfig
from qkvlab.nn.attention import AttentionContext
from qkvlab.nn.blocks import Block, make_norm
from qkvlab.nn.kv_cache import KVCache
from qkvlab.nn.positions import Rotary, sinusoidal_table


class Backbone(nn.Module):
    """Blocks over already-embedded inputs (B, T, C); causal for decoders, bidirectional otherwise."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        if config.positions == "learned":
            self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model)
        elif config.positions == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(config.max_seq_len, config.d_model), persistent=False)
        self.rotary = (Rotary(config.resolved_head_dim, config.max_seq_len, config.rope_theta)
                       if config.positions == "rotary" else None)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config)

    def context(self, batch: int, n_new: int, device, cache: KVCache | None,
                padding_mask: torch.Tensor | None) -> AttentionContext:
        """Positions and masks for one forward pass of `n_new` tokens per row."""
        limit = self.config.max_seq_len
        if cache is None:
            if n_new > limit:
                raise QkvlabError(f"sequence length {n_new} exceeds the model's max_seq_len {limit}")
            q_pos, k_len, offset = torch.arange(n_new, device=device).expand(batch, n_new), n_new, False
        else:
            if cache.batch_size != batch:
                raise QkvlabError(f"the KV cache was made for batch {cache.batch_size}, got batch {batch}")
            k_len = cache.key_length(n_new)
            if k_len > limit:
                raise QkvlabError(f"sequence length {k_len} exceeds the model's max_seq_len {limit}")
            q_pos, offset = cache.positions(n_new, device), bool(cache.lengths.any())
        causal = self.config.causal
        mask = None
        if causal and offset:
            k_pos = torch.arange(k_len, device=device)
            mask = (k_pos <= q_pos[..., None])[:, None]  # (B, 1, T, Tk)
        if padding_mask is not None:
            keys = padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, Tk)
            if causal and mask is None:
                mask = torch.ones(n_new, k_len, dtype=torch.bool, device=device).tril(k_len - n_new)
            mask = keys if mask is None else mask & keys
        return AttentionContext(q_pos=q_pos, k_len=k_len, causal=causal,
                                is_causal=causal and mask is None, mask=mask, cache=cache, rotary=self.rotary)

    def forward(self, h: torch.Tensor, cache: KVCache | None = None, padding_mask: torch.Tensor | None = None,
                need_weights: bool = False):
        """h (B, T, C) -> (B, T, C); with `need_weights`, also one {"scores", "probs"} per layer."""
        B, T, _ = h.shape
        ctx = self.context(B, T, h.device, cache, padding_mask)
        if self.config.positions == "learned":
            h = h + self.pos_emb(ctx.q_pos)  # (B, T, C)
        elif self.config.positions == "sinusoidal":
            h = h + self.pos_table[ctx.q_pos]
        h = self.drop(h)
        weights = []
        for block in self.blocks:
            if need_weights:
                h, w = block(h, ctx, True)
                weights.append(w)
            else:
                h = block(h, ctx)
        if cache is not None:
            cache.advance(T)
        h = self.norm(h)
        return (h, weights) if need_weights else h


def init_weights(model: nn.Module, config: ModelConfig) -> None:
    """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layers), zero biases."""
    residual_std = config.init_std / math.sqrt(2 * config.n_layers)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
            std = residual_std if name.endswith(("attn.proj", "mlp.proj")) else config.init_std
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
