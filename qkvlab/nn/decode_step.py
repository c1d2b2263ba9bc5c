"""A one-token decode step through every block in one native call (csrc/decode_step.cpp).

The Python path runs a block's decode step as ~110 small PyTorch operations; at one token per row their
dispatch costs more than their arithmetic (measured: 2.3 ms of a 12.8 ms six-layer Q-MQA step, 0.86 ms of a
1.09 ms step of a two-layer d_model 128 model). `decode_layers` hands the blocks' weights and the cache's buffers
to one C++ function that runs the same arithmetic (norms, the fused projection, rotary, the cache write, the
one-pass cache read, the output projection, the MLP, the residuals) with the kernels the Python path calls for
the weights and the cache. It serves float32 CPU inference of one new token per row when every row holds as
many tokens (`serves`); anything else (training, ragged batches, quantised caches, the "+" variants, tracing,
other dtypes and devices) runs the modules as before.
"""

from __future__ import annotations

import ctypes
from typing import cast

import torch
from torch import nn

from qkvlab.nn import kv_decode, linear
from qkvlab.nn.blocks import Block

MAX_ROWS = linear.MAX_ROWS  # more rows: the Python path's matrix products are as fast
enabled = True  # False: the blocks always run as modules (benchmarks compare the two; tests of the per-layer path)
_Q_SOURCE = {"q": 0, "k": 1, "x": 2}
_ACTIVATION = {"none": 0, "tanh": 1}
SWIGLU = 2


def serves(blocks: nn.ModuleList, h: torch.Tensor, cache) -> bool:
    """Whether the native step runs this forward of h (B, 1, C) with `cache` (the caller checked one token and
    no mask or attention maps)."""
    if not (enabled and cache.fused_rotary and h.dtype == torch.float32 and h.device.type == "cpu"
            and h.shape[0] <= MAX_ROWS and not cache.quantized and cache.dtype == torch.float32 and cache.uniform
            and linear.enabled
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu") and type(h) is torch.Tensor
            and not kv_decode.watched()
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()):
        return False
    first = cast(Block, blocks[0])
    attn = first.attn
    return (not first.training and attn.pair_bias is None and attn.causal
            and (attn.spec.q_source != "k" or attn.n_heads == attn.n_kv_heads) and linear._kernel() is not None)


def _norm(module: nn.LayerNorm | nn.RMSNorm) -> tuple[int, float]:
    """(kind, eps): 0 LayerNorm, 1 RMSNorm."""
    eps = module.eps if module.eps is not None else torch.finfo(torch.float32).eps
    return (1 if isinstance(module, nn.RMSNorm) else 0), float(eps)


def _ptr(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    if t.dtype != torch.float32 or not t.is_contiguous():
        raise ValueError  # not this kernel's case: the caller falls back
    return t.data_ptr()


# csrc/decode_step.cpp's Layer, in its order (before the cache's pointers): each tensor's path in a Block.
_LAYER = (("norm1", "weight"), ("norm1", "bias"), ("attn", "qkv", "weight"), ("attn", "qkv", "bias"),
          ("attn", "proj", "weight"), ("attn", "proj", "bias"), ("norm2", "weight"), ("norm2", "bias"),
          ("mlp", "fc", "weight"), ("mlp", "fc", "bias"), ("mlp", "proj", "weight"), ("mlp", "proj", "bias"))


def _tensor(module: nn.Module, path: tuple[str, ...]) -> torch.Tensor | None:
    """module's tensor at `path` (None where it has none: a norm without a bias). Submodules and parameters are
    read from the modules' own dicts (nn.Module.__getattr__, ~1 microsecond a call, took 0.1 ms of every step
    of a six-layer model); anything else (a parametrised weight, a property) by getattr."""
    *names, last = path
    for name in names:
        module = module._modules[name]  # type: ignore[assignment]
    params = module._parameters
    return params[last] if last in params else getattr(module, last, None)


def decode_layers(blocks: nn.ModuleList, h: torch.Tensor, cache, rotary) -> torch.Tensor | None:
    """h (B, 1, C) through every block at the cache's next position, the new keys and values written into the
    cache (its lengths are not advanced). Returns the new hidden states (B, 1, C), or None when a weight is not
    a contiguous float32 tensor (then the modules run)."""
    typed = [cast(Block, block) for block in blocks]
    first = typed[0]
    attn, mlp = first.attn, first.mlp
    B, _, C = h.shape
    pos = cache.longest
    if pos >= cache.max_len:
        return None  # a full cache: the modules raise the error (Backbone checks first; never write past it)
    norm, eps = _norm(first.norm1)
    mlp_kind = SWIGLU if mlp.swiglu else _ACTIVATION[mlp.approximate]
    widths = attn.widths
    T = pos + 1
    shape = [len(blocks), B, C, attn.n_heads, attn.n_kv_heads, attn.head_dim, widths["q"], widths["k"], widths["v"],
             _Q_SOURCE[attn.spec.q_source], norm, mlp_kind, mlp.proj.in_features, pos, cache.max_len,
             kv_decode.splits_for(T)]  # csrc/decode_step.cpp's Shape, in its order
    buffers = cache.buffers  # (layers, B, H_kv, max_len, D) each
    try:
        stored = [(_ptr(buffer), buffer.stride(0) * buffer.element_size()) for buffer in buffers]  # (start, layer)
        # Every weight, held until the call returns (a parametrised weight is a temporary).
        tensors = [_tensor(block, path) for block in typed for path in _LAYER]
        layers = []
        for i in range(len(typed)):  # csrc/decode_step.cpp's Layer, in its order
            layers += [_ptr(t) for t in tensors[i * len(_LAYER):(i + 1) * len(_LAYER)]]
            layers += [start + i * step for start, step in stored] + [0] * (2 - len(stored))  # keys, values
    except ValueError:
        return None
    table = None if rotary is None else rotary.read_table(T, h.device, torch.float32)  # (T, D), row pos: the new one
    out = h.clone(memory_format=torch.contiguous_format)  # (B, 1, C), updated in place
    config = (ctypes.c_int64 * len(shape))(*shape)
    plan = (ctypes.c_int64 * len(layers))(*layers)
    kv_decode.library().qkvlab_decode_layers(out.data_ptr(), config, plan,
                                             None if table is None else table.data_ptr(), ctypes.c_float(eps),
                                             torch.get_num_threads())
    return out
