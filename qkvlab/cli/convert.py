"""`qkvlab convert SRC --variant Q-K=V --out DIR`: tie or share the projections of an existing model,
or import one from another format (`--from gpt2|paper|llama`) and convert it."""

from __future__ import annotations

import argparse
from pathlib import Path

from qkvlab.atomic import check_output
from qkvlab.convert import MERGES, convert_variant, load_gpt2, with_rotary_values
from qkvlab.errors import check
from qkvlab.interop.llama import load_llama
from qkvlab.interop.paper import load_paper
from qkvlab.models import Model
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
                   help="how K and V (and pooled heads) become one projection: their mean (default), keep K or V, "
                        "or lsq (fitted on the source's queries on --calibration text; see docs/practitioners.md)")
    p.add_argument("--calibration", metavar="TASK", default=None,
                   help="--merge lsq: a language-modelling task whose training windows the fit uses (shakespeare-char)")
    p.add_argument("--calibration-windows", type=int, default=64, help="--merge lsq: windows to fit on (64)")
    p.add_argument("--rotary-values", action="store_true",
                   help="also turn the values by their positions (model.rotary_values; needs a rotary source, "
                        "e.g. --llama): with K=V the cache is then read with no rotation; a different model, "
                        "uptrain it (docs/practitioners.md)")
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


def calibration_inputs(task_name: str, model, windows: int):
    """`windows` training windows of task `task_name` as `model`'s inputs (seed 0), for --merge lsq."""
    from qkvlab.train.runs import load_task

    task = load_task(task_name)
    check(getattr(task, "family", "") == "lm", f"--calibration {task_name!r} is not a language-modelling task")
    check(task.vocab_size <= model.config.vocab_size, f"--calibration {task_name!r} has a vocabulary of "
          f"{task.vocab_size}, the model only {model.config.vocab_size}")
    task.setup(model.config, "quick")
    return task.model_inputs(task.train_batch(0, windows, 0))


def source_tokenizer(src: str, fmt: str):
    """The tokenizer the converted model records: the source's recorded one (qkvlab), or the tokenizer.json
    of a Hugging Face directory (gpt2, llama); None for the study's checkpoints (they hold none)."""
    from qkvlab.data.tokenizer import TOKENIZER_JSON, tokenizer_file
    from qkvlab.models.tokenizer import recorded_tokenizer

    if fmt == "qkvlab":
        return recorded_tokenizer(src)
    hf_file = Path(src) / TOKENIZER_JSON
    return tokenizer_file(hf_file, Path(src).name) if fmt in ("gpt2", "llama") and hf_file.is_file() else None


def run(args: argparse.Namespace) -> int:
    check(args.fmt == "paper" or (args.n_heads is None and not args.trust_pickle),
          "--n-heads and --trust-pickle apply to --from paper only")
    check(args.n_heads is None or args.n_heads > 0, f"--n-heads must be a positive integer, got {args.n_heads}")
    parse_variant(args.variant)  # an unknown name fails before anything is read
    check_output(args.out, args.force, sources=[args.src])
    check(args.merge == "lsq" or args.calibration is None, "--calibration applies to --merge lsq only")
    check(args.merge != "lsq" or args.calibration is not None,
          "--merge lsq fits the merged projection on calibration text: give --calibration TASK (e.g. shakespeare-char)")
    check(args.merge != "lsq" or args.fmt in ("qkvlab", "gpt2"), f"--merge lsq converts qkvlab models and --from "
          f"gpt2; import --from {args.fmt} with its own --variant first, then convert that with --merge lsq")
    check(args.calibration_windows > 0, f"--calibration-windows must be at least 1, got {args.calibration_windows}")
    model: Model
    if args.fmt == "gpt2":
        model = load_gpt2(args.src, args.variant if args.merge != "lsq" else "QKV", args.merge)
    elif args.fmt == "paper":
        model = load_paper(args.src, args.variant, args.n_heads, args.merge, args.trust_pickle)
    elif args.fmt == "llama":
        model = load_llama(args.src, args.variant, args.merge)
    else:
        model = load_model(args.src)
    if args.fmt == "qkvlab" or args.merge == "lsq":  # imports converted above, except for lsq (gpt2 only)
        calibration = None
        if args.calibration is not None:
            calibration = calibration_inputs(args.calibration, model, args.calibration_windows)
        model = convert_variant(model, args.variant, args.merge, calibration)
    if args.rotary_values:
        check(model.config.positions == "rotary", f"--rotary-values needs a source with rotary positions; "
              f"{args.src} has positions={model.config.positions!r}")
        model = with_rotary_values(model)
    tokenizer = source_tokenizer(args.src, args.fmt)
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        tokenizer = None  # not this model's vocabulary
    out = save_model(model, args.out, tokenizer)
    params = sum(p.numel() for p in model.parameters())
    note = f", tokenizer {tokenizer.name}" if tokenizer is not None else ""
    what = f"{model.config.variant} model" + (" with rotary values" if model.config.rotary_values else "")
    print(f"wrote {what} ({params:,} parameters{note}) to {out}")
    return 0
