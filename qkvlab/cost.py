"""Cost accounting for projection-sharing attention: parameters, multiply-accumulates, KV-cache bytes.

Everything here is arithmetic on an `ArchSpec` (any transformer: ours, a paper preset or a real model
such as Llama 3 8B) and a variant name, and agrees exactly with what the library builds:

- `param_counts(arch, variant)` == `sum(p.numel() for p in build_model(cfg).parameters())`
- `cache_bytes(arch, variant, context, batch, dtype)` == `KVCache.for_model(cfg, batch, context, dtype).nbytes`
- 2 * `macs(arch, variant, seq_len, batch)["total"]` == `measured_flops(build_model(cfg), inputs)`

where `cfg = arch.to_model_config(variant)`.

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

import dataclasses
import math
from dataclasses import dataclass

from qkvlab.errors import QkvlabError, check
from qkvlab.models.config import KINDS, MLPS, NORMS, POSITIONS, PRESETS, DerivedSizes, ModelConfig
from qkvlab.nn.positions import pair_bias_widths
from qkvlab.variants import PAPER_VARIANTS, VariantSpec, parse_variant

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


def _divisors(n: int, limit: int = 16) -> str:
    """The smallest divisors of n, for error messages: "1, 2, 4, 8"."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    found = sorted(set(small + [n // d for d in small]))
    return ", ".join(map(str, found[:limit])) + (", ..." if len(found) > limit else "")


@dataclass(frozen=True)
class ArchSpec(DerivedSizes):
    """A transformer's shape, enough to count its parameters, MACs and KV cache under any variant.

    Field names follow `ModelConfig`. `n_kv_heads` is the architecture's own key/value heads (GQA/MQA;
    None = one per query head). The encoder/ViT fields (`kind`, `input_dim`, `n_classes`, image fields)
    matter only for those kinds. `name` labels tables and is not part of equality.
    """

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int | None = None
    head_dim: int | None = None  # default d_model // n_heads
    d_mlp: int | None = None  # default 4 * d_model
    vocab_size: int = 50304
    mlp: str = "gelu"
    norm: str = "layernorm"
    bias: bool = True
    tie_embeddings: bool = True
    positions: str = "learned"
    max_seq_len: int = 2048
    kind: str = "decoder"
    input_dim: int | None = None
    n_classes: int = 10
    image_size: int = 28
    patch_size: int = 7
    in_channels: int = 1
    dense_head: bool = False
    pair_bias_dim: int = 32
    name: str = dataclasses.field(default="", compare=False)

    def __post_init__(self) -> None:
        for field in ("n_layers", "d_model", "n_heads", "vocab_size", "max_seq_len", "n_classes",
                      "image_size", "patch_size", "in_channels", "pair_bias_dim"):
            value = getattr(self, field)
            check(_is_int(value) and value > 0, f"{field} must be a positive integer, got {value!r}")
        for field in ("n_kv_heads", "head_dim", "d_mlp", "input_dim"):
            value = getattr(self, field)
            check(value is None or (_is_int(value) and value > 0),
                  f"{field} must be a positive integer or None, got {value!r}")
        if self.head_dim is None:
            check(self.d_model % self.n_heads == 0,
                  f"n_heads={self.n_heads} does not divide d_model={self.d_model}; "
                  f"accepted: {_divisors(self.d_model)} (or set head_dim)")
        if self.n_kv_heads is not None:
            check(self.n_kv_heads <= self.n_heads and self.n_heads % self.n_kv_heads == 0,
                  f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}; "
                  f"accepted: {_divisors(self.n_heads)}")
        check(self.kind in KINDS, f"model kind {self.kind!r} is not one of {', '.join(KINDS)}")
        check(self.mlp in MLPS, f"mlp {self.mlp!r} is not one of {', '.join(MLPS)}")
        check(self.norm in NORMS, f"norm {self.norm!r} is not one of {', '.join(NORMS)}")
        check(self.positions in POSITIONS, f"positions {self.positions!r} is not one of {', '.join(POSITIONS)}")
        if self.positions == "rotary":
            check(self.resolved_head_dim % 2 == 0,
                  f"rotary positions need an even head_dim, got {self.resolved_head_dim}")
        if self.kind == "vit":
            check(self.image_size % self.patch_size == 0,
                  f"patch_size={self.patch_size} does not divide image_size={self.image_size}")
            check(self.max_seq_len >= self.n_patches + 1,
                  f"max_seq_len={self.max_seq_len} is shorter than {self.n_patches} patches + 1 class token")
        # The checks above name the accepted values; `ModelConfig` has the last word on the rest (e.g. the
        # "+" table width, even widths for sinusoidal tables), so no arch exists that the library would refuse.
        self.to_model_config("QKV")

    @property
    def resolved_kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def label(self) -> str:
        return self.name or "custom"

    def describe(self) -> str:
        """One line: the sizes a reader needs to check a table."""
        kv = f" ({self.n_kv_heads} kv heads)" if self.n_kv_heads not in (None, self.n_heads) else ""
        text = (f"{self.label}: {self.kind}, {self.n_layers} layers, d_model {self.d_model}, "
                f"{self.n_heads} heads{kv}, head_dim {self.resolved_head_dim}, d_mlp {self.resolved_d_mlp} "
                f"{self.mlp}, {self.norm}, bias {'on' if self.bias else 'off'}, {self.positions} positions, "
                f"max_seq_len {self.max_seq_len}")
        if self.kind == "decoder":
            text += f", vocab {self.vocab_size} ({'tied' if self.tie_embeddings else 'untied'})"
        return text

    def replace(self, **changes) -> "ArchSpec":
        """A copy with `changes` applied (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        check(not unknown, f"unknown architecture field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_model_config(cls, config: ModelConfig, name: str = "") -> "ArchSpec":
        """The architecture of a `ModelConfig` of any kind; its head sharing becomes `n_kv_heads`."""
        spec = config.spec
        return cls(
            n_layers=config.n_layers, d_model=config.d_model, n_heads=config.n_heads,
            n_kv_heads=spec.kv_heads, head_dim=config.head_dim, d_mlp=config.d_mlp,
            vocab_size=config.vocab_size, mlp=config.mlp, norm=config.norm, bias=config.bias,
            tie_embeddings=config.tie_embeddings, positions=config.positions, max_seq_len=config.max_seq_len,
            kind=config.kind, input_dim=config.input_dim, n_classes=config.n_classes,
            image_size=config.image_size, patch_size=config.patch_size, in_channels=config.in_channels,
            dense_head=config.dense_head, pair_bias_dim=config.pair_bias_dim, name=name,
        )

    def to_model_config(self, variant: str | VariantSpec = "QKV", **overrides) -> ModelConfig:
        """A `ModelConfig` of this architecture under `variant` (resolved as `resolve_variant` says)."""
        spec = resolve_variant(self, variant)
        fields = dict(
            kind=self.kind, variant=spec.name, n_layers=self.n_layers, d_model=self.d_model,
            n_heads=self.n_heads, head_dim=self.head_dim, d_mlp=self.d_mlp, max_seq_len=self.max_seq_len,
            vocab_size=self.vocab_size, input_dim=self.input_dim, n_classes=self.n_classes,
            positions=self.positions, norm=self.norm, mlp=self.mlp, bias=self.bias,
            tie_embeddings=self.tie_embeddings, pair_bias_dim=self.pair_bias_dim, image_size=self.image_size,
            patch_size=self.patch_size, in_channels=self.in_channels, dense_head=self.dense_head,
        )
        fields.update(overrides)
        return ModelConfig(**fields)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def resolve_variant(arch: ArchSpec, variant: str | VariantSpec) -> VariantSpec:
    """The variant as it applies to `arch`: its own head sharing if it names one, else the arch's kv heads.

    Raises `QkvlabError` when the variant cannot apply (Q = K with grouped heads, GQA-g with g not
    dividing the heads, Q = X when n_heads * head_dim != d_model).
    """
    spec = parse_variant(variant)
    if spec.kv_heads is None and arch.resolved_kv_heads != arch.n_heads:
        if spec.qk_tied:
            raise QkvlabError(
                f"{spec.name} ties Q to K, so it cannot share {arch.n_kv_heads} key/value heads among "
                f"{arch.n_heads} query heads (grouped query heads would be identical)")
        spec = dataclasses.replace(spec, kv_heads=arch.n_kv_heads)
    spec.validate(arch.n_heads)
    if spec.q_source == "x":
        check(arch.n_heads * arch.resolved_head_dim == arch.d_model,
              f"{spec.name} uses the input as the query, so n_heads * head_dim must equal d_model "
              f"({arch.n_heads} * {arch.resolved_head_dim} != {arch.d_model})")
    return spec


def _llama(**kw) -> ArchSpec:
    base = dict(n_layers=32, d_model=4096, n_heads=32, mlp="swiglu", norm="rmsnorm", bias=False,
                tie_embeddings=False, positions="rotary")
    base.update(kw)
    return ArchSpec(**base)


def _gpt2(**kw) -> ArchSpec:
    base = dict(vocab_size=50257, max_seq_len=1024, mlp="gelu", norm="layernorm", bias=True,
                tie_embeddings=True, positions="learned")
    base.update(kw)
    return ArchSpec(**base)


# Named architectures a user can ask about. Real models use their published shapes; GPT-2's
# lm_head is tied and bias-free, as in ours, so the totals match the published ones.
ARCHS: dict[str, ArchSpec] = {
    "llama-3-8b": _llama(n_kv_heads=8, d_mlp=14336, vocab_size=128256, max_seq_len=8192, name="llama-3-8b"),
    "llama-3.1-8b": _llama(n_kv_heads=8, d_mlp=14336, vocab_size=128256, max_seq_len=131072, name="llama-3.1-8b"),
    "llama-2-7b": _llama(d_mlp=11008, vocab_size=32000, max_seq_len=4096, name="llama-2-7b"),
    "mistral-7b": _llama(n_kv_heads=8, d_mlp=14336, vocab_size=32000, max_seq_len=32768, name="mistral-7b"),
    "gpt2": _gpt2(n_layers=12, d_model=768, n_heads=12, d_mlp=3072, name="gpt2"),
    "gpt2-medium": _gpt2(n_layers=24, d_model=1024, n_heads=16, d_mlp=4096, name="gpt2-medium"),
    "paper-300m": ArchSpec.from_model_config(PRESETS["paper-300m"], name="paper-300m"),
    "paper-1.2b": ArchSpec.from_model_config(PRESETS["paper-1.2b"], name="paper-1.2b"),
}


def get_arch(name: str) -> ArchSpec:
    """A named architecture: one of `ARCHS`, or any `ModelConfig` preset."""
    key = name.strip().lower()
    if key in ARCHS:
        return ARCHS[key]
    if key in PRESETS:
        return ArchSpec.from_model_config(PRESETS[key], name=key)
    accepted = list(ARCHS) + [p for p in PRESETS if p not in ARCHS]
    raise QkvlabError(f"unknown architecture {name!r}; accepted: {', '.join(accepted)}")


def _attention_widths(arch: ArchSpec, spec: VariantSpec) -> tuple[int, int]:
    """(width of the fused qkv projection, width of the attention output H * D)."""
    D, H, H_kv = arch.resolved_head_dim, arch.n_heads, spec.n_kv_heads(arch.n_heads)
    qkv = (H * D if spec.has_q_proj else 0) + H_kv * D + (H_kv * D if spec.has_v_proj else 0)
    return qkv, H * D


def param_counts(arch: ArchSpec, variant: str | VariantSpec = "QKV") -> dict[str, int]:
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


def default_seq_len(arch: ArchSpec) -> int:
    """Tokens of a full-length forward pass: max_seq_len, or a ViT's patches + class token."""
    return arch.n_patches + 1 if arch.kind == "vit" else arch.max_seq_len


def macs(arch: ArchSpec, variant: str | VariantSpec = "QKV", seq_len: int | None = None, batch: int = 1,
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
    check(_is_int(seq_len) and seq_len > 0, f"seq_len must be a positive integer, got {seq_len!r}")
    check(_is_int(batch) and batch > 0, f"batch must be a positive integer, got {batch!r}")
    check(_is_int(past) and past >= 0, f"past must be a non-negative integer, got {past!r}")
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


def cache_bytes_per_token(arch: ArchSpec, variant: str | VariantSpec = "QKV", dtype="bf16") -> int:
    """KV-cache bytes one token of one sequence occupies, over all layers."""
    spec = resolve_variant(arch, variant)
    return arch.n_layers * spec.cache_streams * spec.n_kv_heads(arch.n_heads) * arch.resolved_head_dim \
        * dtype_bytes(dtype)


def cache_bytes(arch: ArchSpec, variant: str | VariantSpec = "QKV", context: int = 2048, batch: int = 1,
                dtype="bf16") -> int:
    """Bytes of a KV cache holding `context` tokens for each of `batch` sequences (== `KVCache.nbytes`).

    Pure arithmetic: `context` may exceed the arch's max_seq_len (the model itself would refuse it).
    """
    check(_is_int(context) and context > 0, f"context must be a positive integer, got {context!r}")
    check(_is_int(batch) and batch > 0, f"batch must be a positive integer, got {batch!r}")
    return cache_bytes_per_token(arch, variant, dtype) * context * batch


def cache_ratio(arch: ArchSpec, variant: str | VariantSpec, baseline: str | VariantSpec = "QKV") -> tuple[int, int]:
    """The cache of `variant` relative to `baseline` as a reduced fraction (numerator, denominator)."""
    num = resolve_variant(arch, variant)
    den = resolve_variant(arch, baseline)
    a = num.cache_streams * num.n_kv_heads(arch.n_heads)
    b = den.cache_streams * den.n_kv_heads(arch.n_heads)
    g = math.gcd(a, b)
    return a // g, b // g


def measured_flops(model, *inputs, **kwargs) -> int:
    """FLOPs of `model(*inputs, **kwargs)` (no grad) measured with `FlopCounterMode`.

    Adds the two formulas stock PyTorch lacks on CPU: the fused CPU SDPA kernel
    (`_scaled_dot_product_flash_attention_for_cpu`, counted like the GPU SDPA kernels: full T x Tk)
    and `aten.mv`. The result equals 2 * `macs(...)["total"]`.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten

    def sdpa_cpu(q, k, v, *args, out_shape=None, **kw) -> int:  # shapes (B, H, T, D), (B, H_kv, Tk, D)
        B, H, T, D = q
        return 2 * B * H * T * k[2] * D + 2 * B * H * T * v[2] * v[3]

    def mv(a, x, *args, out_shape=None, **kw) -> int:  # (n, m) @ (m,)
        return 2 * a[0] * a[1]

    counter = FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu, aten.mv: mv})
    with torch.no_grad(), counter:
        model(*inputs, **kwargs)
    return counter.get_total_flops()
