"""`qkvlab convert SRC --variant Q-K=V --out DIR`: tie or share the projections of an existing model,
or import one from another format (`--from gpt2|paper|llama`) and convert it."""

from __future__ import annotations

import argparse

from qkvlab.atomic import check_output
from qkvlab.convert import MERGES, convert_variant, load_gpt2
from qkvlab.errors import check
from qkvlab.interop.llama import load_llama
from qkvlab.interop.paper import load_paper
from qkvlab.models.io import load_model, save_model
from qkvlab.variants import parse_variant

FORMATS = ("qkvlab", "gpt2", "paper", "llama")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert a checkpoint to another variant (or import GPT-2, the paper's, Llama weights)",
        description="Convert a saved model (export, checkpoint or run directory) to another variant: K=V merges "
                    "the key and value projections, GQA/MQA mean-pools key/value heads, untying is exact. "
                    "--from imports another format first: gpt2 (a Hugging Face GPT-2 directory), paper (a "
                    "torch.save checkpoint of the study's code; its variant is read from the projection names, "
                    "--variant picks it where they are ambiguous), llama (a Hugging Face Llama directory). "
                    "Fine-tune the result briefly (qkvlab train CONFIG init_from=DIR).")
    p.add_argument("src", help="model to convert")
    p.add_argument("--variant", required=True, help="target variant, e.g. Q-K=V, Q-GQA-4, tied-kv")
    p.add_argument("--out", required=True, help="output directory (written atomically; must be new or empty)")
    p.add_argument("--force", action="store_true", help="replace an existing --out (never the source)")
    p.add_argument("--merge", choices=MERGES, default="mean",
                   help="how K and V become one projection: their mean (default) or keep K or V")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--from", dest="fmt", choices=FORMATS, default="qkvlab",
                        help="format of SRC (default qkvlab: an export, checkpoint or run directory)")
    source.add_argument("--gpt2", dest="fmt", action="store_const", const="gpt2", help="same as --from gpt2")
    source.add_argument("--llama", dest="fmt", action="store_const", const="llama", help="same as --from llama")
    p.add_argument("--n-heads", type=int, default=None,
                   help="--from paper: attention heads, when the checkpoint holds no config and is not a paper size")
    p.add_argument("--trust-pickle", action="store_true",
                   help="--from paper: unpickle a checkpoint that holds Python objects besides tensors "
                        "(runs code from the file; only for files you trust)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check(args.fmt == "paper" or (args.n_heads is None and not args.trust_pickle),
          "--n-heads and --trust-pickle apply to --from paper only")
    check(args.n_heads is None or args.n_heads > 0, f"--n-heads must be a positive integer, got {args.n_heads}")
    parse_variant(args.variant)  # an unknown name fails before anything is read
    check_output(args.out, args.force, sources=[args.src])
    if args.fmt == "gpt2":
        model = load_gpt2(args.src, args.variant, args.merge)
    elif args.fmt == "paper":
        model = load_paper(args.src, args.variant, args.n_heads, args.merge, args.trust_pickle)
    elif args.fmt == "llama":
        model = load_llama(args.src, args.variant, args.merge)
    else:
        model = convert_variant(load_model(args.src), args.variant, args.merge)
    out = save_model(model, args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {model.config.variant} model ({params:,} parameters) to {out}")
    return 0
