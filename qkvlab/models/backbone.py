"""The shared transformer stack: position modules, masks, blocks, final norm."""

from __future__ import annotations

import torch
from torch import nn

from qkvlab.arch import ModelConfig
from qkvlab.errors import QkvlabError
from qkvlab.nn import decode_step
from qkvlab.nn.attention import AttentionContext, causal_mask
from qkvlab.nn.blocks import Block, make_norm
from qkvlab.nn.kv_cache import KVCache
from qkvlab.nn.positions import Rotary, SinusoidalPositions


def absolute_positions(config: ModelConfig) -> nn.Module | None:
    """The module giving (B, T, C) position embeddings to add to the inputs, if any."""
    if config.positions == "learned":
        return nn.Embedding(config.max_seq_len, config.d_model)
    if config.positions == "sinusoidal":
        return SinusoidalPositions(config.max_seq_len, config.d_model)
    return None


class Backbone(nn.Module):
    """Blocks over already-embedded inputs (B, T, C); causal for decoders, bidirectional otherwise."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.pos_emb = absolute_positions(config)  # added to the inputs; rotary is applied inside attention
        self.rotary = (Rotary(config.resolved_head_dim, config.max_seq_len, config.rope_theta, config.rotary_dim,
                              config.rotary_values)
                       if config.positions == "rotary" else None)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i, self.rotary) for i in range(config.n_layers))
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
            q_pos, offset = cache.positions(n_new, device), cache.longest > 0
        causal = self.config.causal
        mask = None
        if causal and offset:
            if n_new == 1 and cache is not None and cache.uniform:
                causal = False  # one new token per row, every stored key before it: nothing to mask
            else:
                k_pos = torch.arange(k_len, device=device)
                mask = (k_pos <= q_pos[..., None])[:, None]  # (B, 1, T, Tk)
        if padding_mask is not None:
            keys = padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, Tk)
            if causal and mask is None:
                mask = causal_mask(n_new, k_len, device)
            mask = keys if mask is None else mask & keys
        return AttentionContext(q_pos=q_pos, k_len=k_len, is_causal=causal and mask is None, mask=mask, cache=cache)

    def forward(self, h: torch.Tensor, cache: KVCache | None = None, padding_mask: torch.Tensor | None = None,
                need_weights: bool = False):
        """h (B, T, C) -> (B, T, C); with `need_weights`, also one {"scores", "probs"} per layer."""
        B, T, _ = h.shape
        if cache is not None and T == 1 and padding_mask is None and not need_weights:
            stepped = self._native_step(h, cache)
            if stepped is not None:
                return stepped
        ctx = self.context(B, T, h.device, cache, padding_mask)
        if need_weights:
            ctx.maps = []
        if self.pos_emb is not None:
            h = h + self.pos_emb(ctx.q_pos)  # (B, T, C)
        h = self.drop(h)
        for block in self.blocks:
            h = block(h, ctx)
        if cache is not None:
            cache.advance(T)
        h = self.norm(h)
        return (h, ctx.maps) if need_weights else h

    def _native_step(self, h: torch.Tensor, cache: KVCache) -> torch.Tensor | None:
        """One token per row through every block in one native call (`qkvlab.nn.decode_step`), when it serves
        this step: the final hidden states (B, 1, C), the cache advanced; else None (the blocks run)."""
        if self.training or not decode_step.serves(self.blocks, h.shape[0], cache):
            return None
        if cache.batch_size != h.shape[0] or cache.key_length(1) > self.config.max_seq_len:
            return None  # the general path says what is wrong
        positions = cache.positions(1, h.device)  # (B, 1); raises if the cache is full
        if self.pos_emb is not None:
            h = h + self.pos_emb(positions)  # (B, 1, C)
        out = decode_step.decode_layers(self.blocks, h, cache, self.rotary)
        if out is None:
            return None
        cache.advance(1)
        return self.norm(out)
