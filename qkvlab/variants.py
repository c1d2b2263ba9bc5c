"""Projection-sharing variants as data: parse a name into a frozen spec, format it back.

Grammar (case-insensitive, spaces ignored)::

    name   := body ["+"]                     "+" adds the 2D positional bias
    body   := proj ["/" heads]               general form, e.g. "Q=X/GQA-4"
            | heads                          QKV with head sharing: "GQA-4", "MQA"
            | "Q-" heads                     Q-K=V with head sharing: "Q-GQA-4", "Q-MQA"
    proj   := "QKV" | "Q=K-V" | "Q-K=V" | "Q=K=V" | "Q=X" | "Q=X-K=V"
    heads  := "MHA" | "GQA-" g | "MQA"

Plain aliases stand for the paper's names: see `ALIASES`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qkvlab.errors import QkvlabError

# projection form -> (q_source, kv_tied); q_source is "q" (own projection), "k" (Q = K) or "x" (Q = X)
_PROJECTIONS: dict[str, tuple[str, bool]] = {
    "QKV": ("q", False),
    "Q=K-V": ("k", False),
    "Q-K=V": ("q", True),
    "Q=K=V": ("k", True),
    "Q=X": ("x", False),
    "Q=X-K=V": ("x", True),
}

ALIASES: dict[str, str] = {
    "MHA": "QKV",
    "BASELINE": "QKV",
    "TIED-KV": "Q-K=V",
    "KV": "Q-K=V",
    "TIED-QK": "Q=K-V",
    "QK": "Q=K-V",
    "SINGLE": "Q=K=V",
    "TIED-QKV": "Q=K=V",
    "NO-Q": "Q=X",
    "NO-Q-TIED-KV": "Q=X-K=V",
}

# The variants of the study, in the order tables list them.
PAPER_VARIANTS: tuple[str, ...] = (
    "QKV", "Q=K-V", "Q-K=V", "Q=K=V", "Q=X",
    "GQA-4", "GQA-8", "MQA", "Q-GQA-4", "Q-GQA-8", "Q-MQA",
    "Q=K-V+", "Q=K=V+",
)

ACCEPTED_FORMS = (
    "QKV (MHA), Q=K-V (tied-qk), Q-K=V (tied-kv), Q=K=V (single), Q=X (no-q), Q=X-K=V; "
    "head sharing GQA-<g>, MQA, Q-GQA-<g>, Q-MQA, or <proj>/GQA-<g>; optional '+' suffix for the 2D positional bias"
)

_HEADS_RE = re.compile(r"^(MHA|MQA|GQA-?(\d+))$")


@dataclass(frozen=True)
class VariantSpec:
    """Which projections exist and how heads are shared.

    `q_source`: "q" a query projection, "k" the query is the key (Q = K), "x" the query is the input.
    `kv_tied`: keys and values are one tensor (the cache stores one stream).
    `kv_heads`: number of key/value heads, or None for one per query head.
    `pair_bias`: the "+" 2D positional bias over (query, key) position pairs.
    """

    q_source: str = "q"
    kv_tied: bool = False
    kv_heads: int | None = None
    pair_bias: bool = False

    def __post_init__(self) -> None:
        if self.q_source not in ("q", "k", "x"):
            raise QkvlabError(f"q_source {self.q_source!r} is not one of 'q', 'k', 'x'")
        if self.kv_heads is not None and self.kv_heads < 1:
            raise QkvlabError(f"kv_heads must be a positive integer or None, got {self.kv_heads}")
        if self.q_source == "k" and self.kv_heads is not None:
            raise QkvlabError(
                f"{self.projection_name} ties Q to K, so it cannot share key/value heads "
                "(the grouped query heads would be identical)"
            )

    # --- what exists -------------------------------------------------------------
    @property
    def projection_name(self) -> str:
        for name, (q, tied) in _PROJECTIONS.items():
            if (q, tied) == (self.q_source, self.kv_tied):
                return name
        raise AssertionError("unreachable")

    @property
    def has_q_proj(self) -> bool:
        return self.q_source == "q"

    @property
    def has_v_proj(self) -> bool:
        return not self.kv_tied

    @property
    def qk_tied(self) -> bool:
        return self.q_source == "k"

    @property
    def projections(self) -> tuple[str, ...]:
        """The projection matrices the variant learns, e.g. ("q", "k") for Q-K=V."""
        return tuple(p for p, keep in (("q", self.has_q_proj), ("k", True), ("v", self.has_v_proj)) if keep)

    @property
    def cache_streams(self) -> int:
        """Tensors the KV cache stores per token and key/value head: 1 when K = V, else 2."""
        return 1 if self.kv_tied else 2

    @property
    def symmetric(self) -> bool:
        """Whether the score matrix is symmetric before masking (Q = K without the 2D bias)."""
        return self.qk_tied and not self.pair_bias

    # --- sizes that depend on the model --------------------------------------------
    def n_kv_heads(self, n_heads: int) -> int:
        """Key/value heads for a model with `n_heads` query heads (validated)."""
        self.validate(n_heads)
        return n_heads if self.kv_heads is None else self.kv_heads

    def validate(self, n_heads: int) -> None:
        if self.kv_heads is not None and (self.kv_heads > n_heads or n_heads % self.kv_heads):
            raise QkvlabError(
                f"{self.name} needs key/value heads dividing the {n_heads} heads; {self.kv_heads} does not"
            )

    def cache_fraction(self, n_heads: int) -> float:
        """KV-cache size relative to QKV with the same number of heads."""
        return self.cache_streams * self.n_kv_heads(n_heads) / (2 * n_heads)

    # --- names -------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The canonical name (the paper's where it has one)."""
        return format_variant(self)

    def __str__(self) -> str:
        return self.name


def _heads_name(kv_heads: int | None) -> str:
    if kv_heads is None:
        return ""
    return "MQA" if kv_heads == 1 else f"GQA-{kv_heads}"


def format_variant(spec: VariantSpec) -> str:
    """Canonical name of `spec`; `parse_variant(format_variant(s)) == s`."""
    proj, heads = spec.projection_name, _heads_name(spec.kv_heads)
    if not heads:
        body = proj
    elif proj == "QKV":
        body = heads
    elif proj == "Q-K=V":
        body = f"Q-{heads}"
    else:
        body = f"{proj}/{heads}"
    return body + ("+" if spec.pair_bias else "")


def _parse_heads(text: str, name: str) -> int | None:
    m = _HEADS_RE.match(text)
    if not m:
        raise QkvlabError(f"unknown variant {name!r}: head sharing {text!r} is not MHA, MQA or GQA-<g>; "
                          f"accepted: {ACCEPTED_FORMS}")
    if m.group(1) == "MHA":
        return None
    if m.group(1) == "MQA":
        return 1
    g = int(m.group(2))
    if g < 1:
        raise QkvlabError(f"unknown variant {name!r}: GQA needs at least 1 key/value head, got {g}")
    return g


def parse_variant(name: str | VariantSpec) -> VariantSpec:
    """Parse a variant name ("Q-K=V", "tied-kv", "Q-GQA-4", "Q=K=V+", ...) into a spec."""
    if isinstance(name, VariantSpec):
        return name
    if not isinstance(name, str) or not name.strip():
        raise QkvlabError(f"unknown variant {name!r}; accepted: {ACCEPTED_FORMS}")
    text = re.sub(r"\s+", "", name).upper().replace("_", "-")
    pair_bias = text.endswith("+")
    text = text[:-1] if pair_bias else text
    if text.endswith("+"):
        raise QkvlabError(f"unknown variant {name!r}: at most one '+'; accepted: {ACCEPTED_FORMS}")
    text = ALIASES.get(text, text)
    if "/" in text:
        proj, _, heads_text = text.partition("/")
        proj = ALIASES.get(proj, proj)
        kv_heads = _parse_heads(heads_text, name)
    elif text in _PROJECTIONS:
        proj, kv_heads = text, None
    elif _HEADS_RE.match(text):
        proj, kv_heads = "QKV", _parse_heads(text, name)
    elif text.startswith("Q-") and _HEADS_RE.match(text[2:]):
        proj, kv_heads = "Q-K=V", _parse_heads(text[2:], name)
    else:
        raise QkvlabError(f"unknown variant {name!r}; accepted: {ACCEPTED_FORMS}")
    if proj not in _PROJECTIONS:
        raise QkvlabError(f"unknown variant {name!r}: projection form {proj!r} is not one of "
                          f"{', '.join(_PROJECTIONS)}; accepted: {ACCEPTED_FORMS}")
    q_source, kv_tied = _PROJECTIONS[proj]
    return VariantSpec(q_source=q_source, kv_tied=kv_tied, kv_heads=kv_heads, pair_bias=pair_bias)
