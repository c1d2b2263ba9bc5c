"""A one-token decode step through every block in one native call (csrc/decode_step.cpp).

The Python path runs a block's decode step as ~110 small PyTorch operations; at one token per row their
dispatch costs more than their arithmetic (measured: 2.3 ms of a 12.8 ms six-layer Q-MQA step, 0.86 ms of a
1.09 ms step of a two-layer d_model 128 model). `decode_layers` hands the blocks' weights and the cache's buffers
to one C++ function that runs the same arithmetic (norms, the fused projection, rotary, the cache write, the
one-pass cache read, the output projection, the MLP, the residuals) with the kernels the Python path calls for
the weights and the cache. `decode_tokens` does the whole step in one call, token ids to logits (the embeddings,
the blocks, the final norm and the output layer): the Python and PyTorch operations around the blocks' call cost
0.3-0.6 ms of a 2-3 ms step once the step's 50-60 MB of weights have pushed them out of the CPU's caches. The
weights' addresses are gathered once and kept while every weight is still its module's tensor at that address
(`_Addresses`). It serves float32 CPU inference of one new token per row when every row holds as many tokens
(`serves`); anything else (training, ragged batches, quantised caches, the "+" variants, tracing, other dtypes and
devices) runs the modules as before.
"""

from __future__ import annotations

import ctypes
import weakref
from typing import cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from qkvlab.nn import kv_decode, linear
from qkvlab.nn.attention import Attention
from qkvlab.nn.blocks import MLP, Block
from qkvlab.nn.linear import Linear
from qkvlab.nn.positions import SinusoidalPositions

enabled = True  # False: the blocks always run as modules (benchmarks compare the two; tests of the per-layer path)
whole_step = True  # False: the native call covers the blocks only, embeddings and logits run as modules (benchmarks)
_Q_SOURCE = {"q": 0, "k": 1, "x": 2}
_ACTIVATION = {"none": 0, "tanh": 1}
SWIGLU = 2


def _global_state_serves(rows: int, cache) -> bool:
    """The parts of `serves` that are not the model's: the cache, the batch, grad / autocast / tracing modes."""
    return (enabled and cache.fused_rotary and cache.float32_cpu and cache.uniform
            and linear.enabled and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and not kv_decode.watched() and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and linear._kernel() is not None and rows <= linear.max_rows())


def _blocks_kind_serves(blocks: nn.ModuleList) -> bool:
    """Whether the blocks' attention is of a kind the native step runs (no pair bias, causal; a query taken from
    the keys only with as many key heads): fixed when the blocks are built."""
    attn = cast(Block, blocks[0]).attn
    return (attn.pair_bias is None and attn.causal
            and (attn.spec.q_source != "k" or attn.n_heads == attn.n_kv_heads))


def serves(blocks: nn.ModuleList, rows: int, cache) -> bool:
    """Whether the native step runs a one-token forward of `rows` rows with `cache` (the caller checked one token
    and no mask or attention maps; `decode_layers` and `decode_tokens` check their inputs)."""
    if not _global_state_serves(rows, cache):
        return False
    plan = _plans.get(blocks)
    if plan is not None and plan.layers.generation == _generation:  # the blocks' kind, known since the plan
        return plan.servable and not plan.first.training
    return _blocks_kind_serves(blocks) and not cast(Block, blocks[0]).training


def _norm(module: nn.LayerNorm | nn.RMSNorm) -> tuple[int, float]:
    """(kind, eps): 0 LayerNorm, 1 RMSNorm."""
    eps = module.eps if module.eps is not None else torch.finfo(torch.float32).eps
    return (1 if isinstance(module, nn.RMSNorm) else 0), float(eps)


def _ptr(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError  # not this kernel's case: the caller falls back
    return t.data_ptr()


# csrc/decode_step.cpp's Layer, in its order: each tensor's path in a Block.
_LAYER = (("norm1", "weight"), ("norm1", "bias"), ("attn", "qkv", "weight"), ("attn", "qkv", "bias"),
          ("attn", "proj", "weight"), ("attn", "proj", "bias"), ("norm2", "weight"), ("norm2", "bias"),
          ("mlp", "fc", "weight"), ("mlp", "fc", "bias"), ("mlp", "proj", "weight"), ("mlp", "proj", "bias"))

_generation = 0  # bumped whenever any module registers a submodule, parameter or buffer (a plan's may be replaced)
_watching: list = []  # the handles of PyTorch's global registration hooks, installed by the first plan


def _registered(*_) -> None:
    global _generation
    _generation += 1


def _watch_registrations() -> None:
    """Install the global registration hooks, once, when the first plan is built: before it no plan can go stale,
    so importing qkvlab (or using it without the native step) leaves every module registration alone."""
    if not _watching:
        hooks = torch.nn.modules.module
        _watching.extend(register(_registered) for register in (
            hooks.register_module_module_registration_hook, hooks.register_module_parameter_registration_hook,
            hooks.register_module_buffer_registration_hook))


class _Addresses:
    """Tensors a native call reads, as an int64 array of their addresses (0 for none), built once and reused while
    every tensor is still its module's, at the address the array holds (`current`): gathering a six-layer model's
    72 weights from their modules took 70 microseconds of every step. A module, parameter or buffer registered
    anywhere (attribute assignment of a module or a Parameter, `load_state_dict(assign=True)`, parametrize: the
    global registration hooks of `_watch_registrations`) or a tensor's storage swapped (`.data =`: its address,
    checked every step) is seen at the next step; a module's class changed in place, or its `_parameters` dict
    written directly, is not. Raises ValueError when a tensor is not a contiguous float32 CPU tensor (the caller
    falls back to the modules)."""

    def __init__(self, owners: list[tuple[nn.Module | None, str]]):
        _watch_registrations()
        self.generation = _generation
        # (the owner's parameter or buffer dict, name, tensor or None, address)
        self.entries: list[tuple[dict, str, torch.Tensor | None, int]] = []
        self.reusable = True
        for module, name in owners:
            if module is None:  # none (no position table)
                self.entries.append(({}, name, None, 0))
                continue
            params, buffers = module._parameters, module._buffers
            found = params if name in params else buffers if name in buffers else None
            tensor = found[name] if found is not None else getattr(module, name, None)
            if tensor is not None and found is None:
                self.reusable = False  # computed at each access (torch.nn.utils.parametrize): held for one call
            self.entries.append((found if found is not None else {}, name, tensor, _ptr(tensor)))
        self.array = (ctypes.c_int64 * len(self.entries))(*(ptr for *_, ptr in self.entries))
        held = [(tensor, ptr) for _, _, tensor, ptr in self.entries if tensor is not None]
        self.tensors = [tensor for tensor, _ in held]
        self.addresses = [ptr for _, ptr in held]

    def current(self) -> bool:
        """Still valid: nothing registered since, every tensor at its address (one address read per tensor; the
        owners' dicts are not looked up: 62 -> 32 us once out of the CPU's caches; whole steps 1.015-1.02x)."""
        return (self.reusable and self.generation == _generation
                and list(map(torch.Tensor.data_ptr, self.tensors)) == self.addresses)


_LINEARS, _NORMS = (Linear, nn.Linear), (nn.LayerNorm, nn.RMSNorm)


def _plain(module: nn.Module | None, kinds: tuple[type, ...]) -> bool:
    """Whether `module` is exactly one of `kinds` (possibly with parametrised tensors). A subclass or a wrapper
    (a LoRA adapter, a quantised layer) may compute more than its weight, which the native step would skip."""
    cls = type(module)
    if isinstance(module, nn.Module) and parametrize.is_parametrized(module):
        cls = cls.__bases__[0]  # torch.nn.utils.parametrize's generated subclass
    return cls in kinds


def _block_owners(blocks: nn.ModuleList) -> list[tuple[nn.Module | None, str]]:
    """Each weight's (module, attribute) in csrc's Layer order; ValueError where a block is not made of the
    modules the native step reproduces."""
    owners: list[tuple[nn.Module | None, str]] = []
    for block in blocks:
        b = cast(Block, block)
        if not (type(b) is Block and type(b.attn) is Attention and type(b.mlp) is MLP and _plain(b.norm1, _NORMS)
                and _plain(b.norm2, _NORMS) and all(_plain(m, _LINEARS) for m in (b.attn.qkv, b.attn.proj,
                                                                                   b.mlp.fc, b.mlp.proj))):
            raise ValueError  # the modules run
        for *names, last in _LAYER:
            module = block
            for name in names:
                module = cast(nn.Module, module._modules[name])  # nn.Module.__getattr__ costs ~1 us a call
            owners.append((module, last))
    return owners


class _Plan:
    """What a native step of `blocks` needs that does not change from step to step: the weights' addresses (csrc's
    Layer array) and the static part of its Shape."""

    def __init__(self, blocks: nn.ModuleList):
        first = cast(Block, blocks[0])
        attn, mlp = first.attn, first.mlp
        self.norm = _norm(first.norm1)
        widths = attn.widths
        self.static = (len(blocks), attn.qkv.in_features, attn.n_heads, attn.n_kv_heads, attn.head_dim, widths["q"],
                       widths["k"], widths["v"], _Q_SOURCE[attn.spec.q_source], self.norm[0],
                       SWIGLU if mlp.swiglu else _ACTIVATION[mlp.approximate], mlp.proj.in_features,
                       int(attn.rotary is not None and attn.rotary.values))
        self.layers = _Addresses(_block_owners(blocks))
        self.first = first  # its `training` flag is read at every step
        self.servable = _blocks_kind_serves(blocks)
        self._rotation: tuple = (None, None, 0)  # (Rotary, its table of rows 0..n-1, n), held across steps

    def table(self, rotary, cache) -> int | None:
        """The rotation table's address (rows 0..at least the new position), or None without rotary; read from
        `rotary` only when it has grown (slicing its table cost tens of microseconds of a step)."""
        if rotary is None:
            return None
        held, table, rows = self._rotation
        if held is not rotary or rows <= cache.longest:
            table = rotary.read_table(cache.longest + 1, cache.buffers[0].device)  # (n, D)
            self._rotation = (rotary, table, table.shape[0])
        return table.data_ptr()

    def shape(self, B: int, cache, vocab: int) -> ctypes.Array | None:
        """csrc/decode_step.cpp's Shape for a step of B rows at the cache's next position, or None when the cache
        is full (the modules then raise the error)."""
        pos = cache.longest
        if pos >= cache.max_len:
            return None  # never write past the cache
        buffers = cache.buffers  # (layers, B, H_kv, max_len, D) each
        keys = buffers[0]
        values = buffers[1].data_ptr() if len(buffers) > 1 else 0
        return (ctypes.c_int64 * 21)(*self.static, B, pos, cache.max_len, kv_decode.splits_for(pos + 1),
                                     keys.data_ptr(), values, keys.stride(0), vocab)


_plans: weakref.WeakKeyDictionary[nn.ModuleList, _Plan] = weakref.WeakKeyDictionary()


def _plan(blocks: nn.ModuleList) -> _Plan | None:
    """The blocks' current plan (None when a weight is not a contiguous float32 tensor: the modules run)."""
    plan = _plans.get(blocks)
    if plan is None or not plan.layers.current():
        try:
            plan = _Plan(blocks)
        except ValueError:
            return None
        _plans[blocks] = plan
    return plan


def decode_layers(blocks: nn.ModuleList, h: torch.Tensor, cache, rotary) -> torch.Tensor | None:
    """h (B, 1, C) through every block at the cache's next position, the new keys and values written into the
    cache (its lengths are not advanced). Returns the new hidden states (B, 1, C), or None when a weight is not
    a contiguous float32 tensor or the cache is full (then the modules run)."""
    if not (type(h) is torch.Tensor and h.dtype == torch.float32 and h.device.type == "cpu"):
        return None
    plan = _plan(blocks)
    shape = None if plan is None else plan.shape(h.shape[0], cache, 0)
    if plan is None or shape is None:
        return None
    out = h.clone(memory_format=torch.contiguous_format)  # (B, 1, C), updated in place
    kv_decode.library().qkvlab_decode_layers(out.data_ptr(), shape, plan.layers.array, plan.table(rotary, cache),
                                             ctypes.c_float(plan.norm[1]), torch.get_num_threads())
    return out


class _Head:
    """The tensors a whole step reads around the blocks (csrc's Head), for one set of modules."""

    def __init__(self, modules: tuple[nn.Module | None, ...]):
        tok_emb, positions, norm, lm_head = self.modules = modules
        if not (_plain(tok_emb, (nn.Embedding,)) and _plain(positions, (nn.Embedding, SinusoidalPositions, type(None)))
                and _plain(norm, _NORMS) and _plain(lm_head, _LINEARS)):
            raise ValueError  # the modules run
        table = "weight" if isinstance(positions, nn.Embedding) else "table"  # learned, sinusoidal
        self.addresses = _Addresses([(tok_emb, "weight"), (positions, table), (norm, "weight"), (norm, "bias"),
                                     (lm_head, "weight"), (lm_head, "bias")])
        self.norm = _norm(cast(nn.LayerNorm, norm))
        table_tensor = self.addresses.entries[1][2]
        self.positions = 0 if table_tensor is None else table_tensor.shape[0]  # positions it holds


_heads: weakref.WeakKeyDictionary[nn.Module, _Head] = weakref.WeakKeyDictionary()


def decode_tokens(tok_emb: nn.Embedding, positions: nn.Module | None, blocks: nn.ModuleList, norm: nn.Module,
                  lm_head: nn.Linear, rotary, idx: torch.Tensor, cache) -> torch.Tensor | None:
    """A whole one-token step in one native call: token ids idx (B, 1) through the token and (learned or
    sinusoidal) position embeddings, every block, the final norm and the output layer -> logits (B, 1, V), the
    cache written (its lengths are not advanced). None where it does not serve (then the modules run; they raise
    the errors: a token id out of range, a full cache)."""
    if not (whole_step and type(idx) is torch.Tensor and idx.dtype == torch.long and idx.device.type == "cpu"):
        return None
    idx = idx.contiguous()  # (B, 1): a column of a longer batch is strided
    modules: tuple[nn.Module | None, ...] = (tok_emb, positions, norm, lm_head)
    head = _heads.get(tok_emb)
    if (head is None or any(a is not b for a, b in zip(head.modules, modules, strict=True))
            or not head.addresses.current()):
        if tok_emb.max_norm is not None:
            return None  # renormalised embeddings
        try:
            head = _Head(modules)
        except ValueError:
            return None
        _heads[tok_emb] = head
    plan = _plan(blocks)
    B, V = idx.shape[0], lm_head.out_features
    shape = None if plan is None else plan.shape(B, cache, V)
    if (plan is None or shape is None or plan.norm != head.norm or tok_emb.num_embeddings != V
            or (positions is not None and head.positions <= cache.longest)):
        return None
    logits = torch.empty(B, 1, V)
    bad = kv_decode.library().qkvlab_decode_tokens(idx.data_ptr(), logits.data_ptr(), shape, plan.layers.array,
                                                   head.addresses.array, plan.table(rotary, cache),
                                                   ctypes.c_float(head.norm[1]), torch.get_num_threads())
    return None if bad else logits
