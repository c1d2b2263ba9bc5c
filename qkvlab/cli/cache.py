"""`qkvlab cache`: KV-cache bytes of every variant for a context length, batch and dtype.

The baseline is the user's own model: with `--kv-heads 8` "QKV" means that GQA-8 configuration, and
variants that cannot apply to it (Q = K with grouped heads) are shown as "n/a (reason)".
"""

from __future__ import annotations

import argparse
from typing import Any

from qkvlab.cli.cost import (
    add_arch_arguments,
    add_variant_arguments,
    arch_from_args,
    check_positive,
    length_note,
    parse_variant_list,
    quant_note,
    resolved_name,
)
from qkvlab.cost import cache_bytes, cache_bytes_per_token, dtype_bytes, resolve_variant
from qkvlab.errors import QkvlabError
from qkvlab.table import emit, fraction, human_bytes


def run(args: argparse.Namespace) -> int:
    check_positive(args, "context", "batch")
    named = arch_from_args(args)
    arch = named.config
    specs = parse_variant_list(args.variants)
    dtype_bytes(args.dtype)
    context = arch.max_seq_len if args.context is None else args.context
    baseline = resolve_variant(arch, "QKV")
    base_bytes = cache_bytes(arch, baseline, context, args.batch, args.dtype)
    records: list[dict[str, Any]] = []
    table: list[dict[str, Any]] = []
    for spec in specs:
        try:
            resolved = resolve_variant(arch, spec)
        except QkvlabError as err:
            records.append({"variant": spec.name, "available": False, "reason": str(err)})
            table.append({"variant": spec.name, "total": "n/a", "bytes": "n/a", "note": f"n/a ({err})"})
            continue
        total = cache_bytes(arch, resolved, context, args.batch, args.dtype)
        per_token = cache_bytes_per_token(arch, resolved, args.dtype)
        kv_heads = resolved.n_kv_heads(arch.n_heads)
        records.append({
            "variant": spec.name, "as": resolved.name, "available": True, "kv_heads": kv_heads,
            "cache_streams": resolved.cache_streams, "bytes_per_token": per_token, "bytes": total,
            "vs_baseline": fraction(total, base_bytes), "saving": 1 - total / base_bytes,
        })
        table.append({
            "variant": spec.name, "as": resolved_name(arch, spec), "kv heads": kv_heads,
            "cached": "K=V" if resolved.kv_tied else "K, V", "per token": human_bytes(per_token),
            "total": human_bytes(total), "bytes": total, "vs baseline": fraction(total, base_bytes),
            "saving": f"{100 * (1 - total / base_bytes):.1f} %",
        })
    if not any(row.get("as") for row in table):
        for row in table:
            row.pop("as", None)
    baseline_text = "QKV" if baseline.name == "QKV" else f"QKV as {baseline.name} (the model's own head sharing)"
    notes = [f"Baseline: {baseline_text}, {human_bytes(base_bytes)} ({base_bytes:,} bytes). "
             f"Cache: {context:,} tokens x batch {args.batch} in {args.dtype}{quant_note(args.dtype)}, "
             f"{arch.n_layers} layers x head_dim {arch.resolved_head_dim}."]
    notes += length_note(named, context, "context", "bytes", args.max_seq_len is not None)
    data = {"name": named.label, "arch": arch.to_dict(), "context": context, "batch": args.batch, "dtype": args.dtype,
            "baseline": baseline.name, "baseline_bytes": base_bytes, "variants": records}
    emit(table, args.json, right=("kv heads", "per token", "total", "bytes", "vs baseline", "saving"),
         title=_describe(named), notes=notes, data=data)
    return 0


def _describe(named) -> str:
    arch = named.config
    kv = f" ({arch.n_kv_heads} kv heads)" if arch.n_kv_heads != arch.n_heads else ""
    return f"{named.label}: {arch.n_layers} layers, {arch.n_heads} query heads{kv}, head_dim {arch.resolved_head_dim}"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "cache", help="KV-cache bytes of every variant for a context length, batch and dtype",
        description="KV-cache bytes of each variant (exact, and in binary units) and the saving relative to "
                    "the model's own configuration: with --kv-heads the baseline is that GQA model.")
    add_arch_arguments(parser)
    parser.add_argument("--context", type=int, help="tokens cached per sequence (default: the model's max_seq_len)")
    add_variant_arguments(parser)
    parser.set_defaults(func=run)
