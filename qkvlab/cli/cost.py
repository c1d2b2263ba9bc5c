"""`qkvlab cost`: parameters, MACs and KV cache of every variant on one architecture, vs QKV.

The architecture comes from `--preset` (a `ModelConfig` preset), `--arch` (a named real model or paper
preset, see `qkvlab.cost.ARCHS`) or the size flags; size flags given with a preset or arch override it.
`add_arch_arguments` / `arch_from_args` are shared with `qkvlab cache`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any, NamedTuple

from qkvlab.arch import MLPS, NORMS, POSITIONS, PRESETS, ModelConfig, is_positive_int, with_kv_heads
from qkvlab.cost import (
    ARCHS,
    SCALE_BYTES,
    STUDY_VARIANTS,
    cache_bytes,
    cache_bytes_per_token,
    default_seq_len,
    describe,
    dtype_bytes,
    get_arch,
    is_quantized,
    macs,
    param_counts,
    resolve_variant,
)
from qkvlab.errors import QkvlabError, check
from qkvlab.table import emit, human_bytes, human_count, percent_change
from qkvlab.variants import VariantSpec, parse_variant

# command-line flag (argparse dest) -> ModelConfig field; --kv-heads sets the variant's head sharing
_SIZE_FLAGS = {
    "layers": "n_layers", "d_model": "d_model", "heads": "n_heads", "kv_heads": "n_kv_heads",
    "head_dim": "head_dim", "d_mlp": "d_mlp", "vocab": "vocab_size", "max_seq_len": "max_seq_len",
    "mlp": "mlp", "norm": "norm", "positions": "positions", "bias": "bias", "tie_embeddings": "tie_embeddings",
    "rotary_fraction": "rotary_fraction",
}

# An architecture given by hand: a GPT-2-style language model unless the flags say otherwise.
_BY_HAND = {"vocab_size": 50304, "max_seq_len": 2048}
_DEFAULT: dict[str, Any] = {**{f.name: f.default for f in dataclasses.fields(ModelConfig)}, **_BY_HAND}


class Arch(NamedTuple):
    """The architecture the flags describe, and the name tables show ("" when given by hand)."""

    config: ModelConfig
    name: str

    @property
    def label(self) -> str:
        return self.name or "custom"


def add_arch_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that describe an architecture: a named one, by hand, or a named one modified."""
    on_off = {True: "on", False: "off"}
    named = parser.add_mutually_exclusive_group()
    named.add_argument("--preset", help=f"a model config preset: {', '.join(PRESETS)}")
    named.add_argument("--arch", help=f"a named architecture: {', '.join(ARCHS)} (or a preset)")
    sizes = parser.add_argument_group("architecture by hand (or overriding --preset/--arch)")
    sizes.add_argument("--layers", type=int, help="transformer layers")
    sizes.add_argument("--d-model", type=int, help="model width")
    sizes.add_argument("--heads", type=int, help="query heads")
    sizes.add_argument("--kv-heads", type=int,
                       help="the model's own key/value heads (GQA); the baseline QKV then means this GQA config")
    sizes.add_argument("--head-dim", type=int, help="width of one head (default d_model / heads)")
    sizes.add_argument("--d-mlp", type=int, help="MLP hidden width (default 4 * d_model)")
    sizes.add_argument("--vocab", type=int, help=f"vocabulary size (default {_DEFAULT['vocab_size']})")
    sizes.add_argument("--max-seq-len", type=int,
                       help=f"longest sequence (learned position table; default {_DEFAULT['max_seq_len']})")
    sizes.add_argument("--mlp", choices=MLPS, help=f"MLP kind (default {_DEFAULT['mlp']})")
    sizes.add_argument("--norm", choices=NORMS, help=f"norm kind (default {_DEFAULT['norm']})")
    sizes.add_argument("--positions", choices=POSITIONS, help=f"position encoding (default {_DEFAULT['positions']})")
    sizes.add_argument("--rotary-fraction", type=float,
                       help="share of each head's dims rotary positions rotate (partial rotary; default 1.0)")
    sizes.add_argument("--bias", action=argparse.BooleanOptionalAction, default=None,
                       help=f"biases in linear layers and LayerNorm (default {on_off[_DEFAULT['bias']]})")
    sizes.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=None,
                       help=f"LM head shares the token embedding (default {on_off[_DEFAULT['tie_embeddings']]})")


def _in_flag_terms(err: QkvlabError) -> QkvlabError:
    """The error with field names (n_heads) replaced by the flags the user typed (--heads)."""
    text = str(err)
    for dest, field in _SIZE_FLAGS.items():
        if "_" in field:  # identifiers only: plain words (norm, positions) also appear in prose
            text = re.sub(rf"\b{field}\b", "--" + dest.replace("_", "-"), text)
    return QkvlabError(text)


def arch_from_args(args: argparse.Namespace) -> Arch:
    """The architecture the flags describe (QkvlabError naming what is missing or wrong, by flag)."""
    try:
        return _arch_from_args(args)
    except QkvlabError as err:
        raise _in_flag_terms(err) from None


def _arch_from_args(args: argparse.Namespace) -> Arch:
    overrides = {field: getattr(args, dest) for dest, field in _SIZE_FLAGS.items() if getattr(args, dest) is not None}
    kv_heads = overrides.pop("n_kv_heads", None)
    check(kv_heads is None or is_positive_int(kv_heads), f"n_kv_heads must be a positive integer, got {kv_heads}")
    if args.preset is not None:
        name, base = args.preset, _preset(args.preset)
    elif args.arch is not None:
        base = get_arch(args.arch)
        name = args.arch.strip().lower()
    else:
        missing = [flag for dest, flag in (("layers", "--layers"), ("d_model", "--d-model"), ("heads", "--heads"))
                   if getattr(args, dest) is None]
        check(not missing, f"describe the model with --preset NAME, --arch NAME, or by hand with --layers, "
                           f"--d-model and --heads (missing: {', '.join(missing)})")
        name, base = "", None
    fields = {**(base.to_dict() if base else _BY_HAND), **overrides}
    if kv_heads is not None:  # the model's own head sharing replaces the base's
        fields["variant"] = parse_variant(fields.get("variant", "QKV")).projection_name
    config = ModelConfig(**fields)
    if kv_heads is not None:
        config = config.replace(variant=with_kv_heads(config.variant, config.n_heads, kv_heads).name)
    if base is not None and config != base:
        name = f"{name} (modified)"
    return Arch(config, name)


def _preset(name: str) -> ModelConfig:
    check(name in PRESETS, f"unknown preset {name!r}; accepted: {', '.join(PRESETS)}")
    return PRESETS[name]


def parse_variant_list(values: list[str] | None) -> list[VariantSpec]:
    """Variant names from `--variants` (space- or comma-separated); default: the study's."""
    names = [n for v in values for n in v.split(",") if n.strip()] if values else list(STUDY_VARIANTS)
    return list(dict.fromkeys(parse_variant(n) for n in names))


def add_variant_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variants", nargs="+", metavar="NAME",
                        help="variants to show (default: all of the study); spaces or commas between names")
    parser.add_argument("--batch", type=int, default=1, help="sequences in the batch (default 1)")
    parser.add_argument("--dtype", "--cache-dtype", dest="dtype", default="bf16",
                        help="KV-cache dtype: fp32, bf16, fp16, or quantised int8 / fp8 (1 byte per value plus a "
                             "2-byte bfloat16 scale per token, head and stream) (default bf16)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def resolved_name(arch: ModelConfig, spec: VariantSpec) -> str:
    """What a variant becomes on `arch` (QKV on a GQA-8 model is GQA-8), or "" when it is unchanged."""
    name = resolve_variant(arch, spec).name
    return "" if name == spec.name else name


def check_positive(args: argparse.Namespace, *dests: str) -> None:
    """One-line errors for numeric options that must be positive when given."""
    for dest in dests:
        value = getattr(args, dest)
        check(value is None or value > 0, f"--{dest.replace('_', '-')} must be a positive integer, got {value}")


def quant_note(dtype: str) -> str:
    """" (values + scales)" text for a quantised cache dtype, "" otherwise."""
    return f" (1-byte values + a {SCALE_BYTES}-byte bfloat16 scale per token, head and stream)" \
        if is_quantized(dtype) else ""


def length_note(arch: Arch, length: int, what: str, numbers: str, explicit_max: bool) -> list[str]:
    """A note when `length` exceeds a named (or explicitly sized) model's max_seq_len."""
    limit = arch.config.max_seq_len
    if length <= limit or not (arch.name or explicit_max):
        return []
    return [f"Note: {what} {length:,} exceeds {arch.label}'s max_seq_len {limit:,}; the {numbers} are arithmetic only."]


def run(args: argparse.Namespace) -> int:
    check_positive(args, "seq_len", "batch")
    named = arch_from_args(args)
    arch = named.config
    specs = parse_variant_list(args.variants)
    dtype_bytes(args.dtype)
    seq_len = default_seq_len(arch) if args.seq_len is None else args.seq_len
    base = {"params": param_counts(arch, "QKV")["total"], "macs": macs(arch, "QKV", seq_len, args.batch)["total"],
            "cache": cache_bytes(arch, "QKV", seq_len, args.batch, args.dtype)}
    records, table = [], []
    for spec in specs:
        try:
            resolve_variant(arch, spec)
        except QkvlabError as err:
            records.append({"variant": spec.name, "available": False, "reason": str(err)})
            table.append({"variant": spec.name, "params": "n/a", "MACs": "n/a", "KV cache": "n/a",
                          "note": f"n/a ({err})"})
            continue
        params, ops = param_counts(arch, spec), macs(arch, spec, seq_len, args.batch)
        cache = cache_bytes(arch, spec, seq_len, args.batch, args.dtype)
        as_name = resolved_name(arch, spec)
        records.append({
            "variant": spec.name, "as": as_name or spec.name, "available": True, "params": params, "macs": ops,
            "cache_bytes": cache, "cache_bytes_per_token": cache_bytes_per_token(arch, spec, args.dtype),
            "relative_to_baseline": {"params": params["total"] / base["params"], "macs": ops["total"] / base["macs"],
                                     "cache": cache / base["cache"]},
        })
        table.append({
            "variant": spec.name, "as": as_name,
            "params": human_count(params["total"]), "Δ params": percent_change(params["total"], base["params"]),
            "MACs": human_count(ops["total"]), "Δ MACs": percent_change(ops["total"], base["macs"]),
            "KV cache": human_bytes(cache), "Δ cache": percent_change(cache, base["cache"]),
        })
    if not any(row.get("as") for row in table):
        for row in table:
            row.pop("as", None)
    baseline = resolve_variant(arch, "QKV").name
    data = {"name": named.label, "arch": arch.to_dict(), "seq_len": seq_len, "batch": args.batch, "dtype": args.dtype,
            "baseline": baseline, "baseline_totals": base, "variants": records}
    notes = [
        f"Δ: relative to QKV{'' if baseline == 'QKV' else f' (on this model: {baseline})'}: "
        f"{human_count(base['params'])} params, {human_count(base['macs'])} MACs, {human_bytes(base['cache'])} cache.",
        f"MACs: matrix products of one forward over {seq_len} tokens x batch {args.batch}, including the LM head; "
        "attention scores and weighted sum over the full T x T matrix (no causal halving, as SDPA computes it). "
        "FLOPs = 2 x MACs.",
        f"KV cache: {seq_len} tokens x batch {args.batch} in {args.dtype}{quant_note(args.dtype)}.",
    ] + length_note(named, seq_len, "--seq-len", "counts", args.max_seq_len is not None)
    emit(table, args.json, right=("params", "Δ params", "MACs", "Δ MACs", "KV cache", "Δ cache"),
         title=describe(arch, named.label), notes=notes, data=data)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "cost", help="parameters, MACs and KV cache of every variant, relative to QKV",
        description="Parameters, multiply-accumulates of one forward pass and KV-cache bytes for each variant "
                    "on one architecture, with the change relative to QKV. Computed analytically; the counts "
                    "equal the built models' (see docs/cost.md).")
    add_arch_arguments(parser)
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's max_seq_len)")
    add_variant_arguments(parser)
    parser.set_defaults(func=run)
