"""One attention module for every projection-sharing variant, usable on its own or inside our models.

It learns only the projections the variant needs, fused into one matmul:
QKV [q | k | v], Q-K=V [q | kv], Q=K-V [qk | v], Q=K=V [qkv], Q=X [k | v] (the query is the
input itself). Attention runs through `scaled_dot_product_attention` with grouped heads.

    attn = Attention(d_model=64, n_heads=4, variant="Q-K=V", causal=True)
    y = attn(x)                                  # x (B, T, 64) -> (B, T, 64)

Positions are composed, not built in: a `Rotary` module passed in rotates queries and keys (and values,
turning the output back, with `Rotary(values=True)`), a
`PairBias` module passed in adds the "+" variants' (T, Tk) score bias. A model shares what every
layer of one forward pass needs (positions, mask, KV cache) through an `AttentionContext`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from qkvlab.arch import check_heads, with_kv_heads
from qkvlab.errors import check
from qkvlab.nn.kv_cache import KVCache
from qkvlab.nn.linear import Linear
from qkvlab.nn.positions import PairBias, Rotary, apply_rotary, rotate
from qkvlab.nn.rotary_read import decode_attention
from qkvlab.variants import VariantSpec

# Caches whose keys need no rotation when read (learned positions, or keys stored rotated beside their values)
# go through the fused read only from this many bytes of keys per layer: below it the kernel's fixed cost per
# call is more than SDPA's second pass costs, which hits the CPU's cache anyway (measured with the 16-keys-per-
# vector loop, 6 layers, 6 heads of 64, whole decode steps: equal at 0.75 and 3 MiB at batch 4 and 512 cached
# tokens, the fused read 1.07-1.16x at 3 MiB at batch 1; see docs/PERFORMANCE.md).
STORED_READ_MIN_BYTES = 2 << 20
# With grouped heads SDPA expands the keys to every query head, so the read that takes each key once per group
# pays earlier (measured, Q-MQA, same model: 0.96x at 128 KiB, 0.98-1.08x at 512 KiB, 1.3x and more from 8 MiB).
GROUPED_READ_MIN_BYTES = 512 << 10


@dataclass
class AttentionContext:
    """What every layer of one forward pass shares, computed once by the model."""

    q_pos: torch.Tensor  # (B, T) absolute positions of the inputs
    k_len: int  # keys each query reads (T, or the cache length after writing)
    is_causal: bool  # SDPA's fast causal path applies (no cache offset, no extra mask)
    mask: torch.Tensor | None = None  # (B, 1, T, Tk) bool, True = attend
    cache: KVCache | None = None
    maps: list[dict[str, torch.Tensor]] | None = None  # when a list, each layer appends {"scores", "probs"}
    _rotations: dict = field(default_factory=dict, repr=False)

    @classmethod
    def plain(cls, batch: int, length: int, device, causal: bool) -> AttentionContext:
        """Positions 0..length-1 for every row, no cache, no mask."""
        return cls(q_pos=torch.arange(length, device=device).expand(batch, length), k_len=length, is_causal=causal)

    @property
    def k_pos(self) -> torch.Tensor:
        return torch.arange(self.k_len, device=self.q_pos.device)  # (Tk,)

    def rotations(self, rotary: Rotary, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotations of the query positions (B, 1, T, D/2) and of every key position (Tk, D/2),
        computed once per forward pass and shared by the layers."""
        key = (id(rotary), dtype)
        if key not in self._rotations:
            keys = rotary.prefix(self.k_len, self.q_pos.device, dtype)  # kept across steps, not recomputed
            self._rotations[key] = (rotary.tables(self.q_pos, dtype), keys)
        return self._rotations[key]


class Attention(nn.Module):
    """Multi-head attention whose Q, K, V projections are tied as `variant` says.

    `n_kv_heads` is the model's own key/value heads (GQA) when the variant names none; `head_dim`
    defaults to d_model // n_heads. `causal` applies when no context gives a mask. `rotary` and
    `pair_bias` are position modules (the "+" variants need a `PairBias`). `layer_idx` selects this
    layer's slot in a shared `KVCache`.
    """

    def __init__(self, d_model: int, n_heads: int, variant: str | VariantSpec = "QKV", *,
                 n_kv_heads: int | None = None, head_dim: int | None = None, bias: bool = True,
                 causal: bool = False, dropout: float = 0.0, rotary: Rotary | None = None,
                 pair_bias: PairBias | None = None, layer_idx: int = 0):
        super().__init__()
        spec = with_kv_heads(variant, n_heads, n_kv_heads)
        self.head_dim = check_heads(spec, d_model, n_heads, head_dim)
        check(spec.pair_bias == (pair_bias is not None),
              f"{spec.name} {'needs' if spec.pair_bias else 'takes no'} pair_bias module "
              "(the '+' variants add a PairBias(max_len, dim) to the scores)")
        check(0.0 <= dropout < 1.0, f"dropout must be in [0, 1), got {dropout}")
        self.spec, self.layer_idx, self.causal = spec, layer_idx, causal
        self.n_heads, self.n_kv_heads = n_heads, spec.n_kv_heads(n_heads)
        kv_width = self.n_kv_heads * self.head_dim
        self.widths = {
            "q": n_heads * self.head_dim if spec.has_q_proj else 0,
            "k": kv_width,
            "v": kv_width if spec.has_v_proj else 0,
        }
        self.qkv = Linear(d_model, sum(self.widths.values()), bias=bias)
        self.proj = Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.rotary = rotary
        self.pair_bias = pair_bias
        self.attn_dropout = dropout

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
        """(weight (out, in), bias) of each projection the layer learns, keyed "q", "k", "v"
        (views into the fused projection)."""
        widths = list(self.widths.values())
        weights = self.qkv.weight.split(widths, dim=0)
        biases = self.qkv.bias.split(widths, dim=0) if self.qkv.bias is not None else [None] * 3
        return {name: (w, b) for name, w, b, width in zip(self.widths, weights, biases, widths, strict=True) if width}

    def forward(self, x: torch.Tensor, ctx: AttentionContext | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). Without `ctx`: positions 0..T-1, no cache, causal if `self.causal`."""
        if ctx is None:
            ctx = AttentionContext.plain(x.shape[0], x.shape[1], x.device, self.causal)
        q, k, v = self.project(x)
        rotations = None
        turn_values = self.rotary is not None and self.rotary.values
        if self.rotary is not None:
            rotations = ctx.rotations(self.rotary, q.dtype)
            q = apply_rotary(q, rotations[0])
            if v is not None or turn_values:  # separate V or rotary values: keys are stored rotated
                k = apply_rotary(k, rotations[0])
            if v is not None and turn_values:
                v = apply_rotary(v, rotations[0])
        y = self._attend(q, k, v, ctx, None if turn_values else rotations)  # (B, H, T, D)
        if turn_values and rotations is not None:  # each head's output turned back by its query's position
            y = apply_rotary(y, rotations[0].conj())
        return self._merge(y)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, ctx: AttentionContext,
                rotations: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Heads (B, H, T, D) of attention over q, k, v after the cache write; v None: K = V, whose keys are
        rotated while read when `rotations` is given (rotary keys stored unrotated)."""
        if ctx.cache is not None:
            ctx.cache.write(self.layer_idx, ctx.q_pos, *([k] if v is None else [k, v]))
            if self._narrow_cache(q, ctx) and self._fused_read(q, ctx):
                return self._stored_read(q, ctx, rotate=rotations is not None)
            stored = ctx.cache.read(self.layer_idx, ctx.k_len, q.dtype)  # (B, H_kv, Tk, D) each
            stored = [t.to(q.dtype) for t in stored]
            k, v = (stored[0], None) if v is None else stored
            if v is not None and self._fused_read(q, ctx) and self._large(k):  # keys stored rotated: no tables
                return decode_attention(q, k, None, ctx.mask, values=v)
        split = None  # partial rotary, K = V, few queries: (rotated key dims, unrotated key dims)
        if v is None:  # K = V: one stored tensor, used as stored for the values
            v = k
            if self._fused_read(q, ctx):
                if rotations is not None and self.rotary is not None:
                    rot = self.rotary.read_table(ctx.k_len, q.device, q.dtype)  # (Tk, D)
                    return decode_attention(q, k, rot, ctx.mask)
                if self._large(k):
                    return decode_attention(q, k, None, ctx.mask)  # one read of each key
            if rotations is not None:
                cis = rotations[1]  # (Tk, R/2)
                workspace = None  # reused across layers when decoding with a cache (none kept for the fused read)
                if ctx.cache is not None and not torch.is_grad_enabled() and not ctx.cache.fused_rotary:
                    workspace = ctx.cache.rotation_workspace(ctx.k_len, cis.dtype, pairs=cis.shape[-1])
                rotary_dim = 2 * cis.shape[-1]
                if rotary_dim < self.head_dim and ctx.maps is None and self._split_read(q.shape[-2], rotary_dim):
                    split = rotate(k[..., :rotary_dim], cis, out=workspace), k[..., rotary_dim:]
                else:
                    k = apply_rotary(k, cis, out=workspace)  # (B, H_kv, Tk, D)
        bias = None
        if self.pair_bias is not None:
            q = q * self.pair_bias.score_scale()
            bias = self.pair_bias(ctx.q_pos, ctx.k_pos).to(q.dtype)  # (B, 1, T, Tk)
        if split is not None:
            y = self._split_keys(q, *split, v, bias, ctx)
        elif ctx.maps is not None:
            y = self._explicit(q, k, v, bias, ctx)
        else:
            mask, is_causal = ctx.mask, ctx.is_causal
            if bias is not None:
                if mask is None and is_causal:
                    mask = causal_mask(q.shape[-2], k.shape[-2], q.device)
                mask, is_causal = (bias if mask is None else bias.masked_fill(~mask, float("-inf"))), False
            y = _sdpa(q, k, v, mask, is_causal, self.attn_dropout if self.training else 0.0,
                      self.n_kv_heads != self.n_heads)  # (B, H, T, D)
        return y

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        """Heads (B, H, T, D) -> the output projection (B, T, C)."""
        B, _, T, _ = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # (B, T, C)

    @staticmethod
    def _narrow_cache(q: torch.Tensor, ctx: AttentionContext) -> bool:
        """Whether the cache stores fewer bytes a value than q has and the fused read takes it as stored: int8 /
        float8 (any device), or bfloat16 under a float32 model on the CPU (the kernel widens it as it reads,
        instead of a float32 copy of the layer's cache every step)."""
        assert ctx.cache is not None
        return ctx.cache.quantized or (ctx.cache.dtype == torch.bfloat16 and q.dtype == torch.float32
                                       and q.device.type == "cpu")

    def _stored_read(self, q: torch.Tensor, ctx: AttentionContext, rotate: bool) -> torch.Tensor:
        """One-token attention over an int8 / float8 / bfloat16 cache, widened (dequantised) while read (`rotate`:
        K = V rotary keys, stored unrotated, rotated too; separate keys are stored rotated): (B, H, 1, D)."""
        assert ctx.cache is not None
        streams, scales = ctx.cache.stored(self.layer_idx, ctx.k_len)  # (B, H_kv, Tk, D), (B, H_kv, Tk) each
        separate = len(streams) == 2  # K and V stored apart (keys stored rotated)
        rot = None
        if rotate and not separate and self.rotary is not None:
            rot = self.rotary.read_table(ctx.k_len, q.device, q.dtype)  # (Tk, D)
        quantized = bool(scales)
        return decode_attention(q, streams[0], rot, ctx.mask, scales=scales[0] if quantized else None,
                                values=streams[1] if separate else None,
                                value_scales=scales[1] if separate and quantized else None)

    def _large(self, k: torch.Tensor) -> bool:
        """Whether unrotated keys (B, H_kv, Tk, D) are many enough for the fused read to beat SDPA."""
        least = GROUPED_READ_MIN_BYTES if self.n_kv_heads < self.n_heads else STORED_READ_MIN_BYTES
        return k.device.type == "cpu" and k.numel() * k.element_size() >= least  # the kernel's case only

    def _fused_read(self, q: torch.Tensor, ctx: AttentionContext) -> bool:
        """Whether this step reads its cache through `qkvlab.nn.rotary_read` (K = V: rotary keys rotated on the
        fly; unrotated or separately stored keys from `STORED_READ_MIN_BYTES` a layer; int8 / float8 caches of
        any variant, dequantised while read): asked for by the cache (`fused_rotary`), one new token per row, no
        score bias, no maps kept, no gradients."""
        return (ctx.cache is not None and ctx.cache.fused_rotary and q.shape[-2] == 1 and ctx.maps is None
                and self.pair_bias is None and not torch.is_grad_enabled())

    def attention_maps(self, x: torch.Tensor, ctx: AttentionContext | None = None) -> dict[str, torch.Tensor]:
        """{"scores" (before masking), "probs"}, each (B, H, T, Tk), of this layer on x (B, T, C)."""
        if ctx is None:
            ctx = AttentionContext.plain(x.shape[0], x.shape[1], x.device, self.causal)
        maps: list[dict[str, torch.Tensor]] = []
        self(x, dataclasses.replace(ctx, maps=maps))
        return maps[0]

    def _split_read(self, n_queries: int, rotary_dim: int) -> bool:
        """Whether partial-rotary K = V attention reads its keys in two parts (`_split_keys`): when the
        scores it materialises, (H * T) per key, are no more than the unrotated key dims a full key
        tensor would copy, H_kv * (D - R) per key: one-token decoding, unless a key head serves more
        query heads than it has unrotated dims."""
        return self.n_heads * n_queries <= self.n_kv_heads * (self.head_dim - rotary_dim)

    def _split_keys(self, q: torch.Tensor, k_rot: torch.Tensor, k_pass: torch.Tensor, v: torch.Tensor,
                    bias: torch.Tensor | None, ctx: AttentionContext) -> torch.Tensor:
        """Attention with keys in two parts: the rotated dims k_rot (B, H_kv, Tk, R) and the unrotated
        dims k_pass (B, H_kv, Tk, D - R), read in place from the cache, so partial rotary K = V
        touches only R of each key's D dims (scores = q[:R]·k_rot + q[R:]·k_pass)."""
        B, H, T, D = q.shape
        H_kv, Tk, R = v.shape[1], v.shape[2], k_rot.shape[-1]
        qg = (q * D ** -0.5).reshape(B, H_kv, (H // H_kv) * T, D)  # (B, H_kv, rep*T, D): heads grouped by key head
        scores = qg[..., :R] @ k_rot.transpose(-2, -1) + qg[..., R:] @ k_pass.transpose(-2, -1)  # (B, H_kv, rep*T, Tk)
        scores = scores.view(B, H_kv, H // H_kv, T, Tk)
        if bias is not None:
            scores = scores + bias[:, :, None]  # (B, 1, 1, T, Tk)
        mask = ctx.mask
        if mask is None and ctx.is_causal:
            mask = causal_mask(T, Tk, q.device)  # (T, Tk)
        if mask is not None:
            scores.masked_fill_(~(mask[:, :, None] if mask.dim() == 4 else mask), float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype)  # (B, H_kv, rep, T, Tk)
        if self.training and self.attn_dropout > 0:
            probs = F.dropout(probs, self.attn_dropout)
        return (probs.view(B, H_kv, -1, Tk) @ v).view(B, H, T, D)  # (B, H, T, D)

    def _explicit(self, q, k, v, bias, ctx: AttentionContext) -> torch.Tensor:
        """Attention keeping the score (before masking) and probability matrices in `ctx.maps`, for analysis."""
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
        if ctx.maps is not None:  # always, when called from forward
            ctx.maps.append({"scores": scores, "probs": probs})
        return probs @ v  # (B, H, T, D)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
          dropout_p: float, gqa: bool) -> torch.Tensor:
    """`scaled_dot_product_attention` of (B, H, T, D) heads. Under CPU autocast it runs in float32: PyTorch's
    CPU flash-attention backward in bfloat16 measured ~5x slower than in float32 (docs/PERFORMANCE.md)."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            mask = mask if mask is None or mask.dtype == torch.bool else mask.float()
            return _sdpa(q.float(), k.float(), v.float(), mask, is_causal, dropout_p, gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p,
                                          enable_gqa=gqa)


def causal_mask(t: int, tk: int, device) -> torch.Tensor:
    """(T, Tk) bool, True where query i (the last T of Tk positions) may attend key j."""
    return torch.ones(t, tk, dtype=torch.bool, device=device).tril(tk - t)
