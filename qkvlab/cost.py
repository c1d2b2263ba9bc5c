"""Cost accounting for projection-sharing attention: parameters, multiply-accumulates, KV-cache bytes.

Everything here is arithmetic on a `ModelConfig` (any transformer: ours, a paper preset or a real model
such as Llama 3 8B, see `ARCHS`) and a variant name, and agrees exactly with what the library builds:

- `param_counts(arch, variant)` == `sum(p.numel() for p in build_model(cfg).parameters())`
- `cache_bytes(arch, variant, context, batch, dtype)` == `KVCache.for_model(cfg, batch, context, dtype).nbytes`
- 2 * `macs(arch, variant, seq_len, batch)["total"]` == `measured_flops(build_model(cfg), inputs)`

where `cfg = arch.with_variant(variant)` (the variant defaults to the arch's own). Nothing here imports
PyTorch, except `measured_flops` (the cross-check used by the tests).

How a variant applies to an architecture (`resolve_variant`): the variant's projection tying always
applies; its head sharing applies when it names one ("GQA-4", "Q-MQA"), otherwise the architecture keeps
its own key/value heads. So on Llama 3 8B (32 heads, 8 kv heads) "QKV" is the model as it is (GQA-8),
"Q-K=V" ties K and V of those 8 heads (Q-GQA-8), and "Q=K-V" is refused: a query tied to a grouped key
would make the grouped query heads identical.

What MACs count (`macs`): the matrix products of one forward pass, which is what
`torch.utils.flop_counter.FlopCounterMode` counts (2 FLOPs per MAC). Elementwise work (norms,
activations, softmax, rotary, residual adds, embedding lookups) is not counted. Attention scores (Q Kᵀ)
and the weighted sum (P V) are counted over the full T x Tk matrix, as SDPA's math computes it: causal
masking does not halve them (neither does FlopCounterMode's SDPA formula).

What stock `FlopCounterMode` misses on CPU (PyTorch 2.13), asserted in tests/cost:

- SDPA on CPU dispatches to `aten._scaled_dot_product_flash_attention_for_cpu`, which has no registered
  formula, so it counts 0 for `scores` and `weighted_sum`. Under
  `torch.nn.attention.sdpa_kernel(SDPBackend.MATH)` SDPA decomposes into bmm ops and is counted.
- The "+" variants' pair bias reduces its fixed tables with matrix-vector products (`aten.mv`), which
  have no formula either: `pair_bias` MACs (small: about max_seq_len x pair_bias_dim per layer) are not counted.

`measured_flops` registers both formulas and so measures exactly 2 * `macs(...)["total"]`.
"""

from __future__ import annotations

import math
from typing import Any

from qkvlab.arch import PRESETS, ModelConfig, is_positive_int, pair_bias_widths
from qkvlab.errors import QkvlabError, check
from qkvlab.variants import PAPER_VARIANTS, VariantSpec

# The variants of the study plus Q=X-K=V, in table order.
STUDY_VARIANTS: tuple[str, ...] = (
    PAPER_VARIANTS[:PAPER_VARIANTS.index("Q=X") + 1] + ("Q=X-K=V",) + PAPER_VARIANTS[PAPER_VARIANTS.index("Q=X") + 1:]
)

# Bytes per element of the cache dtypes a user may name (torch dtypes are accepted too).
_DTYPE_BYTES: dict[str, int] = {"fp64": 8, "fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
_DTYPE_ALIASES: dict[str, str] = {
    "float64": "fp64", "double": "fp64", "float32": "fp32", "float": "fp32", "bfloat16": "bf16",
    "float16": "fp16", "half": "fp16", "float8": "fp8", "fp8_e4m3": "fp8", "fp8_e5m2": "fp8",
    "float8_e4m3fn": "fp8", "float8_e5m2": "fp8",
}


# Quantised cache dtypes: symmetric, one bfloat16 scale per (layer, stream, token, key/value head),
# as `qkvlab.nn.kv_cache.KVCache` stores them.
QUANTIZED_DTYPES = ("int8", "fp8")
SCALE_BYTES = 2


def dtype_bytes(dtype) -> int:
    """Bytes per element of `dtype`: a name ("bf16", "float32", ...) or a `torch.dtype`."""
    if not isinstance(dtype, str):
        size = getattr(dtype, "itemsize", None)
        if isinstance(size, int):
            return size
        raise QkvlabError(f"unknown dtype {dtype!r}; accepted: {', '.join(_DTYPE_BYTES)}")
    key = dtype.strip().lower().removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in _DTYPE_BYTES:
        raise QkvlabError(f"unknown dtype {dtype!r}; accepted: {', '.join(_DTYPE_BYTES)} "
                          f"(or {', '.join(_DTYPE_ALIASES)})")
    return _DTYPE_BYTES[key]


def resolve_variant(config: ModelConfig, variant: str | VariantSpec | None = None) -> VariantSpec:
    """`variant` as it applies to `config` (default: the config's own): see `ModelConfig.with_variant`.

    Raises `QkvlabError` when the variant cannot apply (Q = K with grouped heads, GQA-g with g not
    dividing the heads, Q = X when n_heads * head_dim != d_model).
    """
    return config.spec if variant is None else config.with_variant(variant).spec


def describe(config: ModelConfig, label: str = "") -> str:
    """One line: the sizes a reader needs to check a table."""
    kv = f" ({config.n_kv_heads} kv heads)" if config.n_kv_heads != config.n_heads else ""
    positions = f"{config.positions} positions"
    if config.rotary_fraction < 1:
        positions += f" (rotating {config.rotary_dim} of {config.resolved_head_dim} dims per head)"
    if config.rotary_values:
        positions += " with rotary values"
    text = (f"{label or 'custom'}: {config.kind}, {config.n_layers} layers, d_model {config.d_model}, "
            f"{config.n_heads} heads{kv}, head_dim {config.resolved_head_dim}, d_mlp {config.resolved_d_mlp} "
            f"{config.mlp}, {config.norm}, bias {'on' if config.bias else 'off'}, {positions}, "
            f"max_seq_len {config.max_seq_len}")
    if config.kind == "decoder":
        text += f", vocab {config.vocab_size} ({'tied' if config.tie_embeddings else 'untied'})"
    return text


def _llama(**kw) -> ModelConfig:
    base: dict[str, Any] = dict(n_layers=32, d_model=4096, n_heads=32, mlp="swiglu", norm="rmsnorm", bias=False,
                tie_embeddings=False, positions="rotary")
    base.update(kw)
    return ModelConfig(**base)


def _gpt2(**kw) -> ModelConfig:
    base: dict[str, Any] = dict(vocab_size=50257, max_seq_len=1024, mlp="gelu", norm="layernorm", bias=True,
                tie_embeddings=True, positions="learned")
    base.update(kw)
    return ModelConfig(**base)


# Named architectures a user can ask about. Real models use their published shapes; GPT-2's
# lm_head is tied and bias-free, as in ours, so the totals match the published ones.
# The variant carries the model's own key/value heads (Llama 3's GQA-8).
ARCHS: dict[str, ModelConfig] = {
    "llama-3-8b": _llama(variant="GQA-8", d_mlp=14336, vocab_size=128256, max_seq_len=8192),
    "llama-3.1-8b": _llama(variant="GQA-8", d_mlp=14336, vocab_size=128256, max_seq_len=131072),
    "llama-2-7b": _llama(d_mlp=11008, vocab_size=32000, max_seq_len=4096),
    "mistral-7b": _llama(variant="GQA-8", d_mlp=14336, vocab_size=32000, max_seq_len=32768),
    "gpt2": _gpt2(n_layers=12, d_model=768, n_heads=12, d_mlp=3072),
    "gpt2-medium": _gpt2(n_layers=24, d_model=1024, n_heads=16, d_mlp=4096),
    "paper-300m": PRESETS["paper-300m"],
    "paper-1.2b": PRESETS["paper-1.2b"],
}


def get_arch(name: str) -> ModelConfig:
    """A named architecture: one of `ARCHS`, or any `ModelConfig` preset."""
    key = name.strip().lower()
    if key in ARCHS:
        return ARCHS[key]
    if key in PRESETS:
        return PRESETS[key]
    accepted = list(ARCHS) + [p for p in PRESETS if p not in ARCHS]
    raise QkvlabError(f"unknown architecture {name!r}; accepted: {', '.join(accepted)}")


def _attention_widths(arch: ModelConfig, spec: VariantSpec) -> tuple[int, int]:
    """(width of the fused qkv projection, width of the attention output H * D)."""
    D, H, H_kv = arch.resolved_head_dim, arch.n_heads, spec.n_kv_heads(arch.n_heads)
    qkv = (H * D if spec.has_q_proj else 0) + H_kv * D + (H_kv * D if spec.has_v_proj else 0)
    return qkv, H * D


def param_counts(arch: ModelConfig, variant: str | VariantSpec | None = None) -> dict[str, int]:
    """Parameters by part, summed over layers, and their "total" (== the built model's `numel`).

    Parts: embedding (token embedding, input projection, or ViT patch conv + class token), positions
    (learned table), attention (qkv + output projection), mlp, norms (two per layer + final), pair_bias
    (the "+" variants' learned map, pair_bias_dim + 1 per layer), head (untied LM head or the classifier).
    """
    spec = resolve_variant(arch, variant)
    d, L, b = arch.d_model, arch.n_layers, int(arch.bias)
    qkv, attn_out = _attention_widths(arch, spec)
    hidden = arch.resolved_d_mlp
    fc_out = (2 if arch.mlp == "swiglu" else 1) * hidden
    norm = d * (2 if arch.norm == "layernorm" and arch.bias else 1)
    if arch.kind == "decoder":
        embedding = arch.vocab_size * d
        head = 0 if arch.tie_embeddings else arch.vocab_size * d  # lm_head has no bias
    elif arch.kind == "encoder":
        embedding = arch.vocab_size * d if arch.input_dim is None else arch.input_dim * d + b * d
        head = d * arch.n_classes + b * arch.n_classes
    else:  # vit: Conv2d patch embedding (always with bias) and a class token
        p = arch.patch_size
        embedding = arch.in_channels * p * p * d + d + d
        out = arch.n_classes * p * p if arch.dense_head else arch.n_classes
        head = d * out + b * out
    counts = {
        "embedding": embedding,
        "positions": arch.max_seq_len * d if arch.positions == "learned" else 0,
        "attention": L * (d * qkv + b * qkv + attn_out * d + b * d),
        "mlp": L * (d * fc_out + b * fc_out + hidden * d + b * d),
        "norms": (2 * L + 1) * norm,
        "pair_bias": L * (arch.pair_bias_dim + 1) if spec.pair_bias else 0,
        "head": head,
    }
    counts["total"] = sum(counts.values())
    return counts


def default_seq_len(arch: ModelConfig) -> int:
    """Tokens of a full-length forward pass: max_seq_len, or a ViT's patches + class token."""
    return arch.n_patches + 1 if arch.kind == "vit" else arch.max_seq_len


def macs(arch: ModelConfig, variant: str | VariantSpec | None = None, seq_len: int | None = None, batch: int = 1,
         past: int = 0) -> dict[str, int]:
    """Multiply-accumulates of one forward pass of `batch` sequences of `seq_len` new tokens.

    `past` tokens already in a KV cache (decoders) lengthen the keys: Tk = past + seq_len. `seq_len`
    defaults to the arch's max_seq_len (a ViT's is its patches + class token, and is fixed).
    Layer parts are summed over layers; "per_layer" is one layer's sum. Parts: qkv (fused projection),
    scores (Q Kᵀ, full T x Tk, no causal halving), weighted_sum (P V, likewise), out_proj, mlp,
    pair_bias (reducing the "+" tables: once per forward, independent of batch), input (encoder input
    projection or ViT patch conv), head (LM head over every position, or the classifier).
    """
    spec = resolve_variant(arch, variant)
    if arch.kind == "vit":
        tokens = arch.n_patches + 1
        check(seq_len in (None, tokens), f"a ViT of {arch.image_size}px images in {arch.patch_size}px patches "
                                          f"reads {tokens} tokens, not seq_len={seq_len}")
        seq_len = tokens
    elif seq_len is None:
        seq_len = default_seq_len(arch)
    check(is_positive_int(seq_len), f"seq_len must be a positive integer, got {seq_len!r}")
    check(is_positive_int(batch), f"batch must be a positive integer, got {batch!r}")
    check(isinstance(past, int) and not isinstance(past, bool) and past >= 0,
          f"past must be a non-negative integer, got {past!r}")
    check(past == 0 or arch.kind == "decoder", f"only decoders keep a KV cache; past={past} for a {arch.kind}")
    d, L, T, Tk, B = arch.d_model, arch.n_layers, seq_len, past + seq_len, batch
    H, D, hidden = arch.n_heads, arch.resolved_head_dim, arch.resolved_d_mlp
    qkv, attn_out = _attention_widths(arch, spec)
    fc_out = (2 if arch.mlp == "swiglu" else 1) * hidden
    if spec.pair_bias:  # rel (2n-1, m_rel) @ w_rel and abs (n, m_abs) @ w_q, @ w_k: matrix-vector products
        n, (m_rel, m_abs) = arch.max_seq_len, pair_bias_widths(arch.pair_bias_dim)
        pair = (2 * n - 1) * m_rel + 2 * n * m_abs
    else:
        pair = 0
    layer = {
        "qkv": B * T * d * qkv,
        "scores": B * H * T * Tk * D,
        "weighted_sum": B * H * T * Tk * D,
        "out_proj": B * T * attn_out * d,
        "mlp": B * T * (d * fc_out + hidden * d),
        "pair_bias": pair,
    }
    if arch.kind == "decoder":
        inputs, head = 0, B * T * d * arch.vocab_size
    elif arch.kind == "encoder":
        inputs = 0 if arch.input_dim is None else B * T * arch.input_dim * d
        head = B * T * d * arch.n_classes
    else:
        p = arch.patch_size
        inputs = B * arch.n_patches * arch.in_channels * p * p * d
        head = B * arch.n_patches * d * arch.n_classes * p * p if arch.dense_head else B * d * arch.n_classes
    counts = {part: L * value for part, value in layer.items()}
    counts.update(input=inputs, head=head, per_layer=sum(layer.values()))
    counts["total"] = L * counts["per_layer"] + inputs + head
    return counts


def is_quantized(dtype) -> bool:
    """Whether a cache of `dtype` is quantised (int8, fp8): it then stores a scale per token and head."""
    name = dtype if isinstance(dtype, str) else str(dtype)
    key = name.strip().lower().removeprefix("torch.")
    return _DTYPE_ALIASES.get(key, key) in QUANTIZED_DTYPES


def cache_bytes_per_token(arch: ModelConfig, variant: str | VariantSpec | None = None, dtype="bf16") -> int:
    """KV-cache bytes one token of one sequence occupies, over all layers.

    A quantised dtype (int8, fp8) adds one SCALE_BYTES scale per layer, stream and key/value head.
    """
    spec = resolve_variant(arch, variant)
    vectors = arch.n_layers * spec.cache_streams * spec.n_kv_heads(arch.n_heads)
    return vectors * (arch.resolved_head_dim * dtype_bytes(dtype) + (SCALE_BYTES if is_quantized(dtype) else 0))


def cache_bytes(arch: ModelConfig, variant: str | VariantSpec | None = None, context: int = 2048, batch: int = 1,
                dtype="bf16") -> int:
    """Bytes of a KV cache holding `context` tokens for each of `batch` sequences (== `KVCache.nbytes`).

    Pure arithmetic: `context` may exceed the arch's max_seq_len (the model itself would refuse it).
    """
    check(is_positive_int(context), f"context must be a positive integer, got {context!r}")
    check(is_positive_int(batch), f"batch must be a positive integer, got {batch!r}")
    return cache_bytes_per_token(arch, variant, dtype) * context * batch


def cache_ratio(arch: ModelConfig, variant: str | VariantSpec, baseline: str | VariantSpec = "QKV") -> tuple[int, int]:
    """The cache of `variant` relative to `baseline` as a reduced fraction (numerator, denominator)."""
    num = resolve_variant(arch, variant)
    den = resolve_variant(arch, baseline)
    a = num.cache_streams * num.n_kv_heads(arch.n_heads)
    b = den.cache_streams * den.n_kv_heads(arch.n_heads)
    g = math.gcd(a, b)
    return a // g, b // g


def flop_counter():
    """A `FlopCounterMode` (not displaying) that also counts what stock PyTorch lacks on CPU.

    The fused CPU SDPA kernel (`_scaled_dot_product_flash_attention_for_cpu`, counted like the GPU
    SDPA kernels: full T x Tk) and its backward (4 products, twice the forward, as PyTorch counts the
    GPU kernels' backward), and `aten.mv`. Forward + backward of a model under it counts 3 x its forward.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten

    def sdpa_cpu(q, k, v, *args, out_shape=None, **kw) -> int:  # shapes (B, H, T, D), (B, H_kv, Tk, D)
        B, H, T, D = q
        return 2 * B * H * T * k[2] * D + 2 * B * H * T * v[2] * v[3]

    def sdpa_cpu_backward(grad_out, q, k, v, *args, out_shape=None, **kw) -> int:  # dQ, dK, dV, dP
        return 2 * sdpa_cpu(q, k, v)

    def mv(a, x, *args, out_shape=None, **kw) -> int:  # (n, m) @ (m,)
        return 2 * a[0] * a[1]

    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_cpu_backward, aten.mv: mv})


def measured_flops(model, *inputs, **kwargs) -> int:
    """FLOPs of `model(*inputs, **kwargs)` (no grad) measured with `flop_counter()`.

    The result equals 2 * `macs(...)["total"]`.
    """
    import torch

    counter = flop_counter()
    with torch.no_grad(), counter:
        model(*inputs, **kwargs)
    return counter.get_total_flops()
