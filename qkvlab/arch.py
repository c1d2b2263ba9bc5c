"""One description of a transformer's architecture, validated once, importable without PyTorch.

`ModelConfig` is what the models are built from, what the cost calculator counts and what the CLI
describes: a GPT-style decoder, a bidirectional encoder or a ViT, with a projection-sharing variant.
`PRESETS` are the paper's models and two small ones. Activations: `paper-300m` and `paper-1.2b` use
the exact (erf) GELU of the study's code; `tiny` the tanh GELU (the default, GPT-2's); `modern-tiny`
SwiGLU.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from qkvlab.errors import QkvlabError, check
from qkvlab.variants import VariantSpec, parse_variant

KINDS = ("decoder", "encoder", "vit")
POSITIONS = ("learned", "sinusoidal", "rotary", "none")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
# The GELU MLP's activation: "gelu" the exact (erf) form, torch.nn.GELU(), as the study's released
# code uses; "gelu_tanh" the tanh approximation GPT-2 uses. SwiGLU MLPs use SiLU and ignore it.
ACTIVATIONS = ("gelu", "gelu_tanh")


def is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def divisors(n: int, limit: int = 16) -> str:
    """The smallest divisors of n, for error messages: "1, 2, 4, 8"."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    found = sorted(set(small + [n // d for d in small]))
    return ", ".join(map(str, found[:limit])) + (", ..." if len(found) > limit else "")


def rotary_fractions(head_dim: int, limit: int = 8) -> str:
    """The rotary fractions a head of `head_dim` dims accepts, for error messages: "0.25, 0.5, 0.75, 1"."""
    found = [f"{2 * k / head_dim:g}" for k in range(1, head_dim // 2 + 1)]
    return ", ".join(found) if len(found) <= limit else f"{', '.join(found[:3])}, ..., {found[-1]} (k * 2/{head_dim})"


def pair_bias_widths(dim: int) -> tuple[int, int]:
    """Feature widths (offset i - j, each of i and j) of a pair-bias table with m = dim (a multiple of 8)."""
    return dim // 2, dim // 4


def with_kv_heads(variant: str | VariantSpec, n_heads: int, n_kv_heads: int | None) -> VariantSpec:
    """`variant` on a model whose own key/value heads are `n_kv_heads` (None = one per query head).

    The variant's head sharing wins when it names one; otherwise it takes the model's. A query tied
    to grouped keys is refused (the grouped query heads would be identical).
    """
    spec = parse_variant(variant)
    if n_kv_heads is None or n_kv_heads == n_heads or spec.kv_heads is not None:
        return spec
    check(is_positive_int(n_kv_heads) and n_heads % n_kv_heads == 0,
          f"n_kv_heads={n_kv_heads} does not divide n_heads={n_heads}; accepted: {divisors(n_heads)}")
    if spec.qk_tied:
        raise QkvlabError(
            f"{spec.name} ties Q to K, so it cannot share {n_kv_heads} key/value heads among "
            f"{n_heads} query heads (grouped query heads would be identical)")
    return dataclasses.replace(spec, kv_heads=n_kv_heads)


def check_heads(spec: VariantSpec, d_model: int, n_heads: int, head_dim: int | None) -> int:
    """Validate the attention sizes of `spec`; return the head width."""
    if head_dim is None:
        check(d_model % n_heads == 0, f"n_heads={n_heads} does not divide d_model={d_model}; "
                                      f"accepted: {divisors(d_model)} (or set head_dim)")
        head_dim = d_model // n_heads
    spec.validate(n_heads)
    if spec.q_source == "x":
        check(n_heads * head_dim == d_model,
              f"{spec.name} uses the input as the query, so n_heads * head_dim must equal d_model "
              f"({n_heads} * {head_dim} != {d_model})")
    return head_dim


@dataclass(frozen=True)
class ModelConfig:
    """One transformer: a GPT-style decoder, a bidirectional encoder, or a ViT.

    `variant` is any name `parse_variant` accepts (its head sharing is the model's key/value heads);
    `spec` is the parsed form. Decoder and encoder read `vocab_size` (or, for the encoder, `input_dim`
    for continuous inputs); the encoder and ViT read `n_classes`; the ViT reads the image fields.
    """

    kind: str = "decoder"
    variant: str = "QKV"
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    head_dim: int | None = None  # default d_model // n_heads
    d_mlp: int | None = None  # default 4 * d_model
    max_seq_len: int = 128
    vocab_size: int = 256
    input_dim: int | None = None  # encoder on vectors instead of token ids
    n_classes: int = 10
    positions: str = "learned"
    norm: str = "layernorm"
    mlp: str = "gelu"
    # "gelu_tanh" by default: models saved before this field existed (their config has no
    # "activation") were trained with the tanh form and must load with it.
    activation: str = "gelu_tanh"
    bias: bool = True
    dropout: float = 0.0  # residual and embedding dropout, GPT-2 placement
    attn_dropout: float = 0.0
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    # rotary only: the share of each head's dims that rotate (the first rotary_dim; GPT-NeoX's rotary_pct)
    rotary_fraction: float = 1.0
    # rotary only: values turn by their positions too and each head's output turns back by its query's (the
    # output then depends on relative positions only). With K = V the one stored vector is stored rotated, so the
    # cache read rotates nothing (docs/PERFORMANCE.md, "Rotary values").
    rotary_values: bool = False
    pair_bias_dim: int = 32  # m of the (n, n, m) table of the "+" variants (a multiple of 8)
    norm_eps: float = 1e-5
    # ViT
    image_size: int = 28
    patch_size: int = 7
    in_channels: int = 1
    dense_head: bool = False  # per-pixel logits (segmentation) instead of one class per image
    init_std: float = 0.02

    def __post_init__(self) -> None:
        check(self.kind in KINDS, f"model kind {self.kind!r} is not one of {', '.join(KINDS)}")
        spec = parse_variant(self.variant)
        object.__setattr__(self, "variant", spec.name)
        for name in ("n_layers", "d_model", "n_heads", "max_seq_len", "vocab_size", "n_classes",
                     "pair_bias_dim", "image_size", "patch_size", "in_channels"):
            value = getattr(self, name)
            check(is_positive_int(value), f"{name} must be a positive integer, got {value!r}")
        for name in ("head_dim", "d_mlp", "input_dim"):
            value = getattr(self, name)
            check(value is None or is_positive_int(value),
                  f"{name} must be a positive integer or null, got {value!r}")
        check_heads(spec, self.d_model, self.n_heads, self.head_dim)
        check(self.positions in POSITIONS, f"positions {self.positions!r} is not one of {', '.join(POSITIONS)}")
        check(self.norm in NORMS, f"norm {self.norm!r} is not one of {', '.join(NORMS)}")
        check(self.mlp in MLPS, f"mlp {self.mlp!r} is not one of {', '.join(MLPS)}")
        check(self.activation in ACTIVATIONS,
              f"activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        check(0.0 <= self.attn_dropout < 1.0, f"attn_dropout must be in [0, 1), got {self.attn_dropout}")
        check(self.pair_bias_dim % 8 == 0, f"pair_bias_dim must be a multiple of 8, got {self.pair_bias_dim}")
        if self.positions == "sinusoidal":
            check(self.d_model % 2 == 0, f"sinusoidal positions need an even d_model, got {self.d_model}")
        if self.positions == "rotary":
            check(self.resolved_head_dim % 2 == 0,
                  f"rotary positions need an even head_dim, got {self.resolved_head_dim}")
        self._check_rotary_fraction()
        check(isinstance(self.rotary_values, bool),
              f"rotary_values must be true or false, got {self.rotary_values!r}")
        check(not self.rotary_values or self.positions == "rotary",
              f"rotary_values=True needs positions='rotary' (got {self.positions!r})")
        if self.kind == "vit":
            check(self.image_size % self.patch_size == 0,
                  f"patch_size={self.patch_size} does not divide image_size={self.image_size}")
            check(self.max_seq_len >= self.n_patches + 1,
                  f"max_seq_len={self.max_seq_len} is shorter than {self.n_patches} patches + 1 class token")

    def _check_rotary_fraction(self) -> None:
        f, D = self.rotary_fraction, self.resolved_head_dim
        check(isinstance(f, (int, float)) and not isinstance(f, bool),
              f"rotary_fraction must be a number, got {f!r}")
        object.__setattr__(self, "rotary_fraction", float(f))
        if self.positions != "rotary":
            check(f == 1.0, f"rotary_fraction={f!r} needs positions='rotary' (got {self.positions!r}); "
                            "accepted with other positions: 1.0")
            return
        rotated = f * D
        ok = 0 < f <= 1 and abs(rotated - round(rotated)) < 1e-9 and round(rotated) % 2 == 0
        check(ok, f"rotary_fraction={f!r} must be in (0, 1] with rotary_fraction * head_dim ({D}) an even "
                  f"integer; accepted: {rotary_fractions(D)}")

    # --- derived sizes ---------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        """Dims of each head that rotary positions rotate (the first ones); the rest pass through."""
        return round(self.rotary_fraction * self.resolved_head_dim)

    @property
    def spec(self) -> VariantSpec:
        return parse_variant(self.variant)

    @property
    def n_kv_heads(self) -> int:
        return self.spec.n_kv_heads(self.n_heads)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def resolved_d_mlp(self) -> int:
        return self.d_mlp if self.d_mlp is not None else 4 * self.d_model

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def causal(self) -> bool:
        return self.kind == "decoder"

    # --- copies ----------------------------------------------------------------------
    def replace(self, **changes) -> ModelConfig:
        """A copy with `changes` applied (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise QkvlabError(f"unknown model config field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def with_variant(self, variant: str | VariantSpec) -> ModelConfig:
        """This architecture under `variant`: its tying always, its head sharing if it names one
        (else this model's own key/value heads)."""
        own = self.spec.kv_heads
        spec = with_kv_heads(variant, self.n_heads, own)
        check_heads(spec, self.d_model, self.n_heads, self.head_dim)
        return self if spec.name == self.variant else self.replace(variant=spec.name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _gpt2_style(**kw) -> ModelConfig:
    """The paper's language models: learned positions, pre-LayerNorm, exact (erf) GELU MLP as the
    study's released code (`torch.nn.GELU()`), tied embeddings, biases."""
    base: dict[str, Any] = dict(kind="decoder", positions="learned", norm="layernorm", mlp="gelu", activation="gelu",
                                bias=True, tie_embeddings=True, dropout=0.1, max_seq_len=2048, vocab_size=50304)
    base.update(kw)
    return ModelConfig(**base)


PRESETS: dict[str, ModelConfig] = {
    "paper-300m": _gpt2_style(n_layers=20, d_model=1024, n_heads=16, d_mlp=4096),
    "paper-1.2b": _gpt2_style(n_layers=22, d_model=2048, n_heads=32, d_mlp=8192),
    "tiny": ModelConfig(kind="decoder", n_layers=2, d_model=64, n_heads=4, max_seq_len=128, vocab_size=256),
    "modern-tiny": ModelConfig(kind="decoder", n_layers=2, d_model=64, n_heads=4, max_seq_len=128,
                               vocab_size=256, positions="rotary", norm="rmsnorm", mlp="swiglu", bias=False,
                               tie_embeddings=False),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A preset config, with field overrides (e.g. `variant="Q-K=V"`)."""
    if name not in PRESETS:
        raise QkvlabError(f"unknown preset {name!r}; accepted: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
