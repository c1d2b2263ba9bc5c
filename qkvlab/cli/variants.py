"""`qkvlab variants [NAME] [--heads N] [--json]`: the variants of the study, or one variant."""

from __future__ import annotations

import argparse
import json

from qkvlab.cost import STUDY_VARIANTS
from qkvlab.errors import QkvlabError, check
from qkvlab.table import emit, fraction
from qkvlab.variants import ALIASES, VariantSpec, parse_variant

_TIES = {("q", False): "none", ("k", False): "Q=K", ("q", True): "K=V", ("k", True): "Q=K=V",
         ("x", False): "Q=X", ("x", True): "Q=X, K=V"}
_QUERY = {"q": "its own query projection", "k": "the key as the query (Q = K)", "x": "the input as the query (Q = X)"}


def aliases(spec: VariantSpec) -> list[str]:
    """Other names `parse_variant` accepts for `spec` (plain aliases and the general "proj/heads" form)."""
    plus = "+" if spec.pair_bias else ""
    proj = spec.projection_name
    if spec.kv_heads is None:
        names = [a.lower() + plus for a, target in ALIASES.items() if target == proj]
    else:
        heads = "MQA" if spec.kv_heads == 1 else f"GQA-{spec.kv_heads}"
        plain = [a.lower() for a, target in ALIASES.items() if target == proj and proj != "QKV"][:1]
        names = [f"{p}/{heads}{plus}" for p in [proj] + plain]
    return [n for n in names if n != spec.name]


def describe(spec: VariantSpec, heads: int) -> dict:
    """Everything the table shows about `spec` with `heads` query heads (JSON-ready)."""
    row = {
        "variant": spec.name,
        "aliases": aliases(spec),
        "projections": [f"W{p}" for p in spec.projections],
        "tied": _TIES[(spec.q_source, spec.kv_tied)],
        "head_sharing": "MHA" if spec.kv_heads is None else ("MQA" if spec.kv_heads == 1 else f"GQA-{spec.kv_heads}"),
        "cached": "K=V" if spec.kv_tied else "K, V",
        "cache_streams": spec.cache_streams,
        "symmetric": spec.symmetric,
        "pair_bias": spec.pair_bias,
        "heads": heads,
    }
    try:
        kv = spec.n_kv_heads(heads)
    except QkvlabError as err:
        return row | {"available": False, "reason": str(err)}
    stored = spec.cache_streams * kv
    row |= {
        "available": True,
        "kv_heads": kv,
        "cache_vectors": stored,  # head vectors stored per token and layer
        "cache_vs_qkv": fraction(stored, 2 * heads),
        "cache_reduction": round(100.0 * (1 - stored / (2 * heads)), 4),
    }
    return row


def _explain(spec: VariantSpec, row: dict) -> str:
    kv = "tied keys and values (one cached tensor)" if spec.kv_tied else "separate keys and values"
    text = f"{_QUERY[spec.q_source]}, {kv}"
    if row.get("available") and row["kv_heads"] != row["heads"]:
        text += f"; {row['heads']} query heads share {row['kv_heads']} key/value head(s)"
    if spec.pair_bias:
        text += "; plus the 2D positional pair bias"
    return text


def _ratio(row: dict) -> str:
    saved = row["cache_reduction"]
    return row["cache_vs_qkv"] + (f" (-{saved:.4g} %)" if saved else "")


def run(args: argparse.Namespace) -> int:
    check(args.heads > 0, f"--heads must be a positive integer, got {args.heads}")
    if args.name is not None:
        spec = parse_variant(args.name)
        row = describe(spec, args.heads) | {"description": _explain(spec, describe(spec, args.heads))}
        if args.json:
            print(json.dumps(row, indent=2))
        else:
            width = max(map(len, row))
            for key, value in row.items():
                shown = ", ".join(value) if isinstance(value, list) else (
                    ("yes" if value else "no") if isinstance(value, bool) else value)
                print(f"{key.ljust(width)}  {shown}")
        return 0
    rows = [describe(parse_variant(name), args.heads) for name in STUDY_VARIANTS]
    table = []
    for r in rows:
        ok = r["available"]
        table.append({
            "variant": r["variant"], "aliases": r["aliases"], "projections": r["projections"], "tied": r["tied"],
            "heads": r["head_sharing"], "cached": r["cached"],
            "kv heads": r["kv_heads"] if ok else "n/a",
            "vectors/token/layer": r["cache_vectors"] if ok else "n/a",
            "cache vs QKV": _ratio(r) if ok else "n/a",
            "symmetric": r["symmetric"],
            "note": "" if ok else f"n/a ({r['reason']})",
        })
    if all(r["available"] for r in rows):
        for t in table:
            del t["note"]
    emit(table, args.json, right=("kv heads", "vectors/token/layer"),
         title=f"Variants of the study, cache sizes for {args.heads} query heads:",
         notes=["vectors/token/layer: head vectors the KV cache stores per token in each layer "
                "(x head_dim x layers x bytes for the total)."],
         data=rows)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "variants", help="list the projection-sharing variants, their aliases and cache sizes",
        description="The variants of the study: which projections each learns, which are tied, how many "
                    "tensors the KV cache stores per token, and the cache relative to QKV. "
                    "Give a NAME (any accepted spelling, e.g. tied-kv or Q-GQA-4) to show one.")
    parser.add_argument("name", nargs="?", help="one variant to show (any accepted name)")
    parser.add_argument("--heads", type=int, default=16, help="query heads for the cache column (default 16)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)
