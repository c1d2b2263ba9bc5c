"""One-token K = V attention that rotates keys as it reads them: no rotated copy of the cache.

With K = V and rotary positions the cache holds the shared tensor unrotated (it is also the value).
The plain path rotates the whole cache into a workspace at every step: a read and a write of the
cache on top of attention's own reads, and working memory as large as the cache. Here the rotation is
folded into the score reduction instead. For a key k at position n and a query q (pairs rotated as
complex numbers, C and S the cosine and sine of each pair's angle repeated over its two dims):

    q . rot_n(k) = sum_d k[d] * (C[n, d] q[d] + S[n, d] q~[d]),   q~ = (q1, -q0) per pair (q0, q1)

so one pass over the unrotated keys gives the scores, with one table (n, D) of each pair's (cos, sin)
(`Rotary.read_table`) shared by every row, head and layer. Float32 on the CPU runs `qkvlab.nn.kv_decode`, a
small C++ kernel that reads the cache once (scores, online softmax and values per block of keys); on CUDA, where
Triton is installed, `qkvlab.nn.triton_read` does the same one pass as a Triton kernel. Elsewhere `torch.compile`
turns the expression into one loop (its C++ backend for other CPU dtypes; Triton on GPUs) and the values are read
by one matmul: two passes.
"""

from __future__ import annotations

import functools

import torch

from qkvlab.errors import QkvlabError
from qkvlab.nn import kv_decode, triton_read
from qkvlab.nn.kv_cache import dequantize


def pair_swap(q: torch.Tensor) -> torch.Tensor:
    """q (..., D) -> q~ (..., D): each pair (q0, q1) becomes (q1, -q0)."""
    pairs = q.unflatten(-1, (-1, 2))  # (..., D/2, 2)
    return torch.stack((pairs[..., 1], -pairs[..., 0]), dim=-1).flatten(-2)


def rotary_scores(q: torch.Tensor, q_swap: torch.Tensor, k: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Scores of grouped queries against keys rotated on the fly.

    q, q_swap (B, H_kv, G, D) (G query heads per key head, already scaled); k (B, H_kv, Tk, D) unrotated;
    rot (Tk, D), each pair's (cos, sin). Returns (Tk, B, H_kv, G). Positions are the outermost loop so that a
    compiled kernel reads each table row once for every row and head (tables read per head would cost more than
    the keys), and the query heads of a key head innermost, so each key is read once for all of them. Eager, this
    materialises (Tk, B, H_kv, G, D): use it compiled (`compiled_scores`).
    """
    keys = k.permute(2, 0, 1, 3)[:, :, :, None, :]  # (Tk, B, H_kv, 1, D)
    cos, sin = (rot[:, i::2].repeat_interleave(2, -1)[:, None, None, None, :] for i in (0, 1))  # (Tk, 1, 1, 1, D)
    weights = cos * q[None] + sin * q_swap[None]  # (Tk, B, H_kv, G, D)
    return (keys * weights).sum(-1)  # (Tk, B, H_kv, G)


@functools.cache
def compiled_scores():
    """`rotary_scores` through torch.compile, with dynamic shapes (the key length grows every step)."""
    return torch.compile(rotary_scores, dynamic=True, fullgraph=True)


def check_available(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    """Build (or compile) and run the fused read once on a tiny input: a clear one-line error now if this
    machine cannot (no C++ compiler, a failed build), rather than in the middle of a generation."""
    device = torch.device(device)
    q = torch.ones(1, 1, 1, 4, device=device, dtype=dtype)
    kv, rot = torch.ones(1, 1, 3, 4, device=device, dtype=dtype), torch.tensor([[1.0, 0.0] * 2] * 3, device=device)
    if triton_read.serves(q, kv):
        try:
            triton_read.decode(q, kv, rot, None)
        except Exception as e:  # noqa: BLE001 - a failed Triton build means the path is unavailable
            raise QkvlabError(f"the fused rotary read's Triton kernel failed on {device.type}: {_first_line(e)}") \
                from None
        return
    if kv_decode.serves(q, kv):
        kv_decode.library()  # raises QkvlabError with the compiler's first line
        return
    try:
        compiled_scores()(q, q, kv, rot.to(dtype))
    except Exception as e:  # noqa: BLE001 - any backend failure means the path is unavailable
        raise QkvlabError(f"the fused rotary read needs torch.compile on {device.type}, which failed here: "
                          f"{_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def unavailable(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> str | None:
    """Why the fused read cannot run here (`check_available`'s one line), or None when it can."""
    try:
        check_available(device, dtype)
    except QkvlabError as e:
        return str(e)
    return None


def decode_attention(q: torch.Tensor, kv: torch.Tensor, rot: torch.Tensor | None, mask: torch.Tensor | None = None,
                     scales: torch.Tensor | None = None, values: torch.Tensor | None = None,
                     value_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one new token per row over a cache read once (K = V, or keys and values apart).

    q (B, H, 1, D) rotated to its own position; kv (B, H_kv, Tk, D) the stored shared tensor; rot (Tk, D) from
    `Rotary.read_table`, or None for keys read as stored (learned positions: the gain is
    that each key is read once for every query head of its group); mask None or bool broadcastable to
    (B, 1, 1, Tk), True = attend; scales (B, H_kv, Tk) with an int8 / float8 `kv` (the kernel dequantises
    while it reads; other paths dequantise first); `values` (and, quantised, `value_scales`): a cache's separate
    values (QKV, GQA: keys stored rotated, so no tables). Returns (B, H, 1, D).
    """
    B, H, T, D = q.shape
    H_kv, Tk = kv.shape[1], kv.shape[2]
    if T != 1:
        raise QkvlabError(f"the fused cache read is for one new token per row, got {T}")
    qg = (q * D ** -0.5).reshape(B, H_kv, H // H_kv, D)  # (B, H_kv, G, D): query heads grouped by key head
    if triton_read.serves(qg, kv, scales, values):  # CUDA (or Triton's interpreter): one pass over the cache
        flags = None if mask is None else mask.reshape(-1, Tk).expand(B, Tk)  # (B, Tk)
        return triton_read.decode(qg, kv, rot, flags, scales, values, value_scales).reshape(B, H, 1, D)
    if kv_decode.serves(qg, kv):  # float32 on the CPU: one pass over the cache
        flags = None if mask is None else mask.reshape(-1, Tk).expand(B, Tk)  # (B, Tk)
        swapped = None if rot is None else pair_swap(qg)
        return kv_decode.decode(qg, swapped, kv, rot, flags, scales, values, value_scales).reshape(B, H, 1, D)
    if scales is not None:
        kv = dequantize(kv, scales, q.dtype)  # (B, H_kv, Tk, D)
    elif kv.dtype != q.dtype:  # a narrower float cache the kernels did not take (a FLOP counter on): widened here
        kv, values = kv.to(q.dtype), None if values is None else values.to(q.dtype)
    vals = kv if values is None else values if value_scales is None else dequantize(values, value_scales, q.dtype)
    if rot is None:
        scores = qg @ kv.transpose(-2, -1)  # (B, H_kv, G, Tk)
    else:
        scores = compiled_scores()(qg, pair_swap(qg), kv, rot.to(kv.dtype))  # (Tk, B, H_kv, G)
        scores = scores.permute(1, 2, 3, 0)  # (B, H_kv, G, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask.reshape(-1, 1, 1, Tk), float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.promote_types(kv.dtype, torch.float32)).to(kv.dtype)  # (B, H_kv, G, Tk)
    return (probs @ vals).reshape(B, H, 1, D)  # (B, H, 1, D)
