"""GPT-style decoder: the paper's language model (and a modern RoPE/RMSNorm/SwiGLU option)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qkvlab.arch import ModelConfig
from qkvlab.errors import check
from qkvlab.models.backbone import Backbone
from qkvlab.models.init import draw_seed, init_weights
from qkvlab.nn import decode_step
from qkvlab.nn.cross_entropy import linear_cross_entropy
from qkvlab.nn.kv_cache import KVCache, resolve_cache_dtype
from qkvlab.nn.linear import Linear


class GPT(nn.Module):
    def __init__(self, config: ModelConfig, seed: int | None = None):
        super().__init__()
        seed = draw_seed() if seed is None else seed  # before any module draws from the global generator
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.backbone = Backbone(config)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        init_weights(self, config, seed)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, return_attention: bool = False,
                targets: torch.Tensor | None = None):
        """Token ids (B, T) -> logits (B, T, V); with a `cache`, each row continues from its cached length.
        With `targets` (B, T) of next-token ids: their mean cross-entropy (targets of -100 not counted), computed
        with the output layer in chunks of rows, without the full logits (`qkvlab.nn.cross_entropy`)."""
        if targets is not None:
            check(cache is None and not return_attention, "targets= gives the training loss: it takes no cache and "
                                                          "no return_attention")
            return self._loss(idx, targets)
        if cache is not None and not return_attention and idx.dim() == 2 and idx.shape[1] == 1:
            logits = self._native_step(idx, cache)
            if logits is not None:
                return logits
        out = self.backbone(self.tok_emb(idx), cache=cache, need_weights=return_attention)
        h, weights = out if return_attention else (out, None)
        logits = self.lm_head(h)  # (B, T, V)
        return (logits, weights) if return_attention else logits

    def _native_step(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor | None:
        """One token per row, embeddings to logits, in one native call (`qkvlab.nn.decode_step`) when it serves
        this step: the logits (B, 1, V), the cache advanced; else None (the modules run)."""
        bb = self.backbone
        if (self.training or bb.training or cache.batch_size != idx.shape[0]
                or cache.key_length(1) > self.config.max_seq_len
                or not decode_step.serves(bb.blocks, idx.shape[0], cache)):
            return None  # the modules say what is wrong, if anything
        logits = decode_step.decode_tokens(self.tok_emb, bb.pos_emb, bb.blocks, bb.norm, self.lm_head, bb.rotary,
                                           idx, cache)
        if logits is not None:
            cache.advance(1)
        return logits

    def _loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h = self.backbone(self.tok_emb(idx))  # (B, T, C)
        if type(self.lm_head) is Linear and self.lm_head.bias is None:
            return linear_cross_entropy(h, self.lm_head.weight, targets)
        logits = self.lm_head(h)  # a wrapped or biased output layer: the plain loss  (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C), for callers that need logits at a few positions only."""
        return self.backbone(self.tok_emb(idx), cache=cache)

    def make_cache(self, batch_size: int, max_len: int | None = None,
                   dtype: str | torch.dtype | None = None, fused_rotary: bool = False) -> KVCache:
        """A preallocated cache on the model's device, in its dtype unless given.

        `dtype="int8"` (or "fp8") quantises the cache: 1 byte per value plus a bfloat16 scale per
        token and head; reads dequantise to the model's dtype. `fused_rotary`: one-token steps read the
        cache in one pass (`qkvlab.nn.rotary_read`; `generate` turns it on by default on the CPU): K = V
        rotary keys rotated while read, quantised caches dequantised while read, and the unrotated keys of
        large caches (any variant; grouped key heads once for all their query heads) read once.
        """
        param = self.tok_emb.weight
        return KVCache.for_model(self.config, batch_size, max_len, resolve_cache_dtype(dtype) or param.dtype,
                                 param.device, fused_rotary)
