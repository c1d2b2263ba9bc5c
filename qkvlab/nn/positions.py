"""Position encodings as small modules: sinusoidal tables, rotary embeddings, the "+" variants' 2D pair bias.

Learned and sinusoidal positions are added to the embeddings by the model; rotary rotates queries and
keys inside attention; the pair bias adds one (T, Tk) term to the attention scores.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qkvlab.arch import pair_bias_widths
from qkvlab.errors import check


def sinusoidal_table(n: int, dim: int, offset: int = 0, base: float = 10000.0) -> torch.Tensor:
    """Fixed sin/cos features of positions offset..offset+n-1: (n, dim), dim even."""
    pos = torch.arange(offset, offset + n, dtype=torch.float64)[:, None]  # (n, 1)
    freqs = torch.exp(-math.log(base) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
    angles = pos * freqs  # (n, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).float()  # (n, dim)


class SinusoidalPositions(nn.Module):
    """Fixed sin/cos embeddings of absolute positions: positions (B, T) -> (B, T, dim)."""

    table: torch.Tensor  # buffer (n, dim)

    def __init__(self, max_len: int, dim: int):
        super().__init__()
        self.register_buffer("table", sinusoidal_table(max_len, dim), persistent=False)  # (n, dim)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.table[positions]


def rotation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype rotary arithmetic runs in: float64 for float64 models, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Rotary(nn.Module):
    """Rotary position embedding: each pair (x[2i], x[2i+1]) of a head rotates as a complex number.

    `rotary_dim` (default `head_dim`, even) is how many of each head's first dims rotate; the rest
    pass through unchanged (partial rotary, GPT-NeoX's `rotary_pct`), with frequencies
    theta^(-2i / rotary_dim) as GPT-NeoX has them. Angles are computed for the positions asked, in
    float32 (float64 for float64 models), so they stay exact however the model's dtype is changed
    (there are no tables to be cast). Attention calls it on queries and keys: `rotary(x, positions)`,
    or with precomputed `tables(...)`.

    `values`: attention also turns each value by its key's position and each head's output back by its
    query's, so that out_m = sum_n p_mn R(n - m) v_n depends on relative positions only (VO-RoPE: J. Su, "The
    second type of rotary position encoding", kexue.fm/archives/10862, 2025). Keys and values are then stored
    rotated, which with K = V leaves the cache read nothing to rotate.
    """

    def __init__(self, head_dim: int, max_len: int, theta: float = 10000.0, rotary_dim: int | None = None,
                 values: bool = False):
        super().__init__()
        self.head_dim, self.max_len, self.theta, self.values = head_dim, max_len, theta, values
        self.rotary_dim = head_dim if rotary_dim is None else rotary_dim
        check(0 < self.rotary_dim <= head_dim and self.rotary_dim % 2 == 0,
              f"rotary_dim={self.rotary_dim} must be even and in 2..head_dim ({head_dim})")
        self._prefixes: dict[tuple, torch.Tensor] = {}  # (kind, device, dtype) -> table of positions 0..n-1

    def tables(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Unit complex rotations for `positions` (B, T) -> (B, 1, T, R/2), or (T,) -> (T, R/2) with
        R = rotary_dim, complex64 (complex128 when `dtype` is float64)."""
        real = rotation_dtype(dtype)
        dims = torch.arange(0, self.rotary_dim, 2, device=positions.device, dtype=real)
        inv_freq = self.theta ** (-dims / self.rotary_dim)  # (R/2,)
        angles = positions.to(real)[..., None] * inv_freq  # (..., T, R/2)
        cis = torch.polar(torch.ones_like(angles), angles)
        return cis[:, None] if positions.dim() == 2 else cis

    def prefix(self, n: int, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`tables(arange(n))`, (n, R/2), from a table kept across calls: decoding reads every cached
        position at every step, and recomputing their angles costs more than reading them. The values
        are bit-identical to `tables`'s (the same arithmetic, once)."""
        if torch.compiler.is_compiling():
            return self.tables(torch.arange(n, device=device), dtype)
        return self._prefix("cis", n, device, dtype)

    def read_table(self, n: int, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The rotations of positions 0..n-1 as real pairs, (n, D) in `dtype`'s real type: pair i's (cos, sin)
        at dims (2i, 2i + 1), and (1, 0) on the pairs partial rotary leaves alone. The form
        `qkvlab.nn.rotary_read` folds into the scores (each pair's values stored once: half the bytes of a
        cosine and a sine per dim, which the cache read re-reads for every row and head)."""
        return self._prefix("pairs", n, device, dtype)  # (n, D)

    def _prefix(self, kind: str, n: int, device, dtype: torch.dtype) -> torch.Tensor:
        key = (kind, torch.device(device), rotation_dtype(dtype))
        table = self._prefixes.get(key)
        length = 0 if table is None else table.shape[-2]
        if table is None or length < n:
            length = max(n, min(2 * length, self.max_len))  # grow by doubling: a few builds per generation
            with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable later in training
                cis = self.tables(torch.arange(length, device=device), dtype)  # (n, R/2)
                if kind == "cis":
                    table = cis
                else:
                    pad = torch.polar(cis.real.new_ones(length, (self.head_dim - self.rotary_dim) // 2),
                                      cis.real.new_zeros(length, (self.head_dim - self.rotary_dim) // 2))
                    table = torch.view_as_real(torch.cat([cis, pad], -1)).flatten(-2)  # (n, D): (cos, sin) pairs
            self._prefixes[key] = table
        return table[..., :n, :]

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (B, H, T, D) rotated to `positions` (B, T) or (T,)."""
        return apply_rotary(x, self.tables(positions, x.dtype))


def rotate(x: torch.Tensor, cis: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, H, T, R) with every pair rotated by `cis` (complex, broadcastable to (B, H, T, R/2)).

    `out`, a complex (B, H, T, R/2) workspace of `cis`'s dtype, receives the product without
    allocating: with K = V the whole cache is rotated at every decode step, and fresh buffers cost
    more than the arithmetic.
    """
    pairs = torch.view_as_complex(x.to(rotation_dtype(x.dtype)).unflatten(-1, (-1, 2)))  # (B, H, T, R/2)
    rotated = pairs * cis if out is None else torch.mul(pairs, cis, out=out)
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)  # (B, H, T, R)


def apply_rotary(x: torch.Tensor, cis: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate the first R dims of x (B, H, T, D) by `cis` (complex (..., R/2), broadcastable to
    (B, H, T, R/2)); dims R.. pass through (partial rotary). `out` as in `rotate`."""
    rotary_dim = 2 * cis.shape[-1]
    if rotary_dim == x.shape[-1]:
        return rotate(x, cis, out)  # (B, H, T, D)
    return torch.cat([rotate(x[..., :rotary_dim], cis, out), x[..., rotary_dim:]], dim=-1)  # (B, H, T, D)


class PairBias(nn.Module):
    """The 2D positional encoding of the "+" variants, as one (T, Tk) bias per forward pass.

    The fixed table P (n, n, m) holds, for each (query i, key j) pair, sinusoidal features of
    the offset i - j (m/2 dims), of i (m/4) and of j (m/4). A learned linear map m -> 1 turns
    s_ij + P_ij into the logit: w.(s_ij + P_ij) + b = s_ij * sum(w) + (P w)_ij + b. Because P
    is built from per-offset and per-position features, (P w) is computed from three vectors
    of length <= 2n and P itself is never materialised.
    """

    rel: torch.Tensor  # buffer (2n-1, m_rel)
    abs: torch.Tensor  # buffer (n, m_abs)

    def __init__(self, max_len: int, dim: int):
        super().__init__()
        rel_dim, abs_dim = pair_bias_widths(dim)
        self.max_len = max_len
        self.register_buffer("rel", sinusoidal_table(2 * max_len - 1, rel_dim, offset=-(max_len - 1)),
                             persistent=False)  # (2n-1, m_rel), row r = offset r-(n-1)
        self.register_buffer("abs", sinusoidal_table(max_len, abs_dim), persistent=False)  # (n, m_abs)
        self.dim = dim
        self.weight = nn.Parameter(torch.full((self.dim,), 1.0 / self.dim))  # (m,)
        self.bias = nn.Parameter(torch.zeros(()))

    def score_scale(self) -> torch.Tensor:
        """sum(w): the factor on every raw score s_ij."""
        return self.weight.sum()

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """(P w)_ij + b for query positions (B, T) or (T,) and key positions (Tk,): (B, 1, T, Tk) or (T, Tk)."""
        m_rel, m_abs = self.rel.shape[1], self.abs.shape[1]
        w_rel, w_q, w_k = self.weight.split([m_rel, m_abs, m_abs])
        rel = self.rel @ w_rel  # (2n-1,)
        by_q, by_k = self.abs @ w_q, self.abs @ w_k  # (n,), (n,)
        offsets = q_pos[..., None] - k_pos + (self.max_len - 1)  # (..., T, Tk)
        bias = rel[offsets] + by_q[q_pos][..., None] + by_k[k_pos] + self.bias  # (..., T, Tk)
        return bias[:, None] if q_pos.dim() == 2 else bias
