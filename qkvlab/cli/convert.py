"""`qkvlab convert SRC --variant Q-K=V --out DIR`: tie or share the projections of an existing model."""

from __future__ import annotations

import argparse

from qkvlab.atomic import check_output
from qkvlab.convert import MERGES, convert_variant, load_gpt2
from qkvlab.models.io import load_model, save_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert a checkpoint to another variant (or import a Hugging Face GPT-2)",
        description="Convert a saved model (export, checkpoint or run directory) to another variant: K=V merges "
                    "the key and value projections, GQA/MQA mean-pools key/value heads, untying is exact. "
                    "With --gpt2, SRC is a Hugging Face GPT-2 directory (config.json + model.safetensors). "
                    "Fine-tune the result briefly (qkvlab train CONFIG init_from=DIR).")
    p.add_argument("src", help="model to convert")
    p.add_argument("--variant", required=True, help="target variant, e.g. Q-K=V, Q-GQA-4, tied-kv")
    p.add_argument("--out", required=True, help="output directory (written atomically; must be new or empty)")
    p.add_argument("--force", action="store_true", help="replace an existing --out (never the source)")
    p.add_argument("--merge", choices=MERGES, default="mean",
                   help="how K and V become one projection: their mean (default) or keep K or V")
    p.add_argument("--gpt2", action="store_true", help="SRC is a Hugging Face GPT-2 checkpoint directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output(args.out, args.force, sources=[args.src])
    if args.gpt2:
        model = load_gpt2(args.src, args.variant, args.merge)
    else:
        model = convert_variant(load_model(args.src), args.variant, args.merge)
    out = save_model(model, args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {model.config.variant} model ({params:,} parameters) to {out}")
    return 0
