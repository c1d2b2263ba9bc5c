"""The fused one-token cache read as a Triton kernel: what `qkvlab.nn.kv_decode` does on the CPU, for GPUs.

One pass over the cache (flash-decoding): each program takes one (row, key head) and one range of keys, rotates
each key by its position's (cos, sin) as it is loaded (K = V with rotary positions: the cache holds the shared
tensor unrotated, because it is also the value), scores it against every query head of its group, and keeps an
online softmax and the weighted sum of the same loaded vectors as values. The ranges' partial results are merged
by log-sum-exp. Float caches of any dtype Triton loads, and int8 caches dequantised as read (one scale per row,
head and token); keys stored rotated (separate values) read with no table.

Runs on CUDA tensors. For tests and debugging it also runs on CPU tensors through Triton's interpreter, op by
op and slowly, when `TRITON_INTERPRET=1` was set before triton was first imported and `ON_CPU` is True: that is
how the tests check it on machines without a GPU. Triton is optional (`pip install triton`; PyTorch's CUDA wheels
bring it); without it `serves` is False and `qkvlab.nn.rotary_read` uses torch.compile.
"""

from __future__ import annotations

import functools
import math
import os

import torch

SCALED_DTYPES = (torch.int8,)  # one-byte caches this kernel dequantises itself (float8: the other paths)
LOADED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_KEYS_PER_SPLIT = 256  # a program's range of keys: at least this many, so its fixed cost is spread
PROGRAMS_PER_SM = 4  # key ranges: enough programs to fill the GPU when rows x key heads are few


ON_CPU = False  # serve CPU tensors through Triton's interpreter (tests, debugging)


def interpreting() -> bool:
    """Whether Triton's interpreter is asked for (`TRITON_INTERPRET=1`, read by triton as it is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@functools.cache
def _triton():
    """The triton module, or None where it is not installed (or fails to import)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - an absent or broken install means the other paths
        return None
    return triton


def available() -> bool:
    return _triton() is not None


def serves(q: torch.Tensor, kv: torch.Tensor, scales: torch.Tensor | None = None,
           values: torch.Tensor | None = None) -> bool:
    """Whether this kernel applies: Triton importable; the tensors on a CUDA device (or on the CPU with `ON_CPU`
    under the interpreter); a float cache Triton loads, or int8 with its scales; each vector's dims contiguous."""
    device = q.device.type
    if not (device == "cuda" or (device == "cpu" and ON_CPU and interpreting())) or kv.device != q.device:
        return False
    if (kv.dtype in SCALED_DTYPES) != (scales is not None) or not (kv.dtype in LOADED_DTYPES or scales is not None):
        return False
    if values is not None and values.dtype != kv.dtype:
        return False
    if kv.stride(-1) != 1 or (values is not None and values.stride(-1) != 1):
        return False
    return available()


@functools.cache
def _kernel():
    """The jitted kernel (interpreted if triton was imported under `TRITON_INTERPRET=1`)."""
    triton = _triton()
    tl = triton.language

    def split_read(Q, K, V, KS, VS, ROT, MASK, M_OUT, L_OUT, ACC_OUT,
                   s_qb, s_qh, s_qg, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_sb, s_sh, s_vsb, s_vsh, s_mb,
                   H_kv, G, Tk, D, keys_per_split,  # Triton reads the annotations: tl is this function's local
                   BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,  # type: ignore[name-defined]
                   ROTATE: tl.constexpr, SCALED: tl.constexpr, SEPARATE: tl.constexpr,  # type: ignore[name-defined]
                   HAS_MASK: tl.constexpr):  # type: ignore[name-defined]
        bh = tl.program_id(0)
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        b = bh // H_kv
        h = bh % H_kv
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        t_in = tl.arange(0, BLOCK_T)
        g_ok = g < G
        d_ok = d < D
        q = tl.load(Q + b * s_qb + h * s_qh + g[:, None] * s_qg + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # (G, D), scaled
        partner = d ^ 1  # the other dim of each pair
        sign = tl.where(d % 2 == 0, -1.0, 1.0)  # (k0, k1) -> (k0 cos - k1 sin, k1 cos + k0 sin)
        cos_at = d - d % 2  # the table holds each pair's (cos, sin) at its two dims
        m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        l_sum = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
        start = split * keys_per_split
        end = tl.minimum(start + keys_per_split, Tk)
        k_row = K + b * s_kb + h * s_kh
        for t0 in range(start, end, BLOCK_T):
            t = t0 + t_in
            t_ok = t < end
            td_ok = t_ok[:, None] & d_ok[None, :]
            k = tl.load(k_row + t[:, None] * s_kt + d[None, :], mask=td_ok, other=0.0).to(tl.float32)  # (T, D)
            if SCALED:
                k_scale = tl.load(KS + b * s_sb + h * s_sh + t, mask=t_ok, other=0.0).to(tl.float32)  # (T,)
                k = k * k_scale[:, None]
            key = k
            if ROTATE:
                kp = tl.load(k_row + t[:, None] * s_kt + partner[None, :], mask=td_ok, other=0.0).to(tl.float32)
                if SCALED:
                    kp = kp * k_scale[:, None]
                table = ROT + t[:, None] * D + cos_at[None, :]
                cos = tl.load(table, mask=td_ok, other=0.0)
                sin = tl.load(table + 1, mask=td_ok, other=0.0)
                key = k * cos + kp * sin * sign[None, :]  # (T, D) rotated to its position
            s = tl.sum(q[:, None, :] * key[None, :, :], axis=2)  # (G, T)
            keep = t_ok
            if HAS_MASK:
                keep = keep & (tl.load(MASK + b * s_mb + t, mask=t_ok, other=0) != 0)
            s = tl.where(keep[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))  # (G,)
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing attended yet: weights exp(-inf) = 0
            alpha = tl.exp(m - shift)  # rescales what came before (0 on the first attended block)
            p = tl.exp(s - shift[:, None])  # (G, T)
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            if SEPARATE:
                v = tl.load(V + b * s_vb + h * s_vh + t[:, None] * s_vt + d[None, :], mask=td_ok,
                            other=0.0).to(tl.float32)
                if SCALED:
                    v_scale = tl.load(VS + b * s_vsb + h * s_vsh + t, mask=t_ok, other=0.0).to(tl.float32)
                    v = v * v_scale[:, None]
            else:
                v = k  # K = V: the values are the keys as stored (unrotated)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)  # (G, D)
            m = m_new
        out = (bh * n_splits + split) * BLOCK_G + g  # (G,) in the partials' (B * H_kv, splits, BLOCK_G) layout
        tl.store(M_OUT + out, m)
        tl.store(L_OUT + out, l_sum)
        tl.store(ACC_OUT + out[:, None] * BLOCK_D + d[None, :], acc)

    return triton.jit(split_read)


def splits_for(rows: int, length: int, device: torch.device) -> int:
    """Key ranges per (row, key head): enough programs to fill a GPU, each over >= MIN_KEYS_PER_SPLIT keys."""
    most = max(1, length // MIN_KEYS_PER_SPLIT)
    if device.type != "cuda":
        return min(2, most)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(most, math.ceil(PROGRAMS_PER_SM * sms / max(rows, 1))))


def blocks(G: int, D: int) -> tuple[int, int, int]:
    """(BLOCK_G, BLOCK_T, BLOCK_D): query heads, keys and dims a program holds at once. Its (G, T, D) products
    are kept near 2,048 floats: compiled for sm_80 (tests/core/triton_aot.py, no GPU needed) that is 72-140
    registers a thread and nothing spilled at 1-8 heads a key and head sizes 64 and 128; 4,096 used 244-255
    registers and spilled."""
    block_g, block_d = triton_pow2(G), max(16, triton_pow2(D))
    return block_g, max(4, min(32, 2048 // (block_g * block_d))), block_d


def decode(q: torch.Tensor, kv: torch.Tensor, rot: torch.Tensor | None, mask: torch.Tensor | None,
           scales: torch.Tensor | None = None, values: torch.Tensor | None = None,
           value_scales: torch.Tensor | None = None, splits: int | None = None) -> torch.Tensor:
    """q (B, H_kv, G, D) scaled, rotated to its position; kv (B, H_kv, Tk, D) as stored (K = V: unrotated),
    int8 with `scales` (B, H_kv, Tk); rot (Tk, D) each pair's (cos, sin) (`Rotary.read_table`), or None for
    keys read as stored; mask (B, Tk) bool (True = attend) or None; `values` (and `value_scales`): separate
    values. `splits`: key ranges per (row, key head) (default: `splits_for`). Returns (B, H_kv, G, D) in q's dtype.
    """
    B, H_kv, G, D = q.shape
    Tk = kv.shape[2]
    splits = splits or splits_for(B * H_kv, Tk, q.device)
    keys_per_split = math.ceil(Tk / splits)
    splits = math.ceil(Tk / keys_per_split)
    block_g, block_t, block_d = blocks(G, D)
    qc = q.contiguous()
    m = torch.empty(B * H_kv, splits, block_g, device=q.device, dtype=torch.float32)  # each range's partials
    l_sum = torch.empty_like(m)
    acc = torch.empty(B * H_kv, splits, block_g, block_d, device=q.device, dtype=torch.float32)
    vals = kv if values is None else values
    ks = scales if scales is not None else m  # unused pointers when not read: any tensor on the device
    vs = value_scales if value_scales is not None else ks
    table = rot.to(torch.float32).contiguous() if rot is not None else m
    flags = mask.to(torch.int8).contiguous() if mask is not None else m
    _kernel()[(B * H_kv, splits)](
        qc, kv, vals, ks, vs, table, flags, m, l_sum, acc,
        qc.stride(0), qc.stride(1), qc.stride(2), kv.stride(0), kv.stride(1), kv.stride(2),
        vals.stride(0), vals.stride(1), vals.stride(2),
        ks.stride(0), ks.stride(1), vs.stride(0), vs.stride(1), flags.stride(0),
        H_kv, G, Tk, D, keys_per_split,
        BLOCK_G=block_g, BLOCK_T=block_t, BLOCK_D=block_d, ROTATE=rot is not None,
        SCALED=scales is not None, SEPARATE=values is not None, HAS_MASK=mask is not None)
    return merge(m, l_sum, acc)[:, :G, :D].reshape(B, H_kv, G, D).to(q.dtype)


def merge(m: torch.Tensor, l_sum: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """Partials of the key ranges (N, S, G), (N, S, G), (N, S, G, D) -> attention outputs (N, G, D)."""
    top = m.amax(dim=1, keepdim=True)  # (N, 1, G)
    w = torch.exp(m - top)  # (N, S, G): a range with nothing attended -> 0
    return (w[..., None] * acc).sum(1) / (w * l_sum).sum(1)[..., None]  # (N, G, D)


def triton_pow2(n: int) -> int:
    """The smallest power of two >= n (Triton's blocks are powers of two)."""
    return 1 << max(0, (n - 1).bit_length())
