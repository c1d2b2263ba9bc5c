"""`qkvlab export MODEL --format hf|gpt2|llama --out DIR`: a saved decoder in Hugging Face formats."""

from __future__ import annotations

import argparse

from qkvlab.atomic import check_output
from qkvlab.errors import QkvlabError

FORMATS = ("hf", "gpt2", "llama", "pt2", "executorch")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a saved decoder to Hugging Face (qkvlab model type, stock GPT-2 or Llama)",
        description="Write a saved decoder (export, checkpoint or run directory) as a Hugging Face model "
                    "directory. --format hf (every variant, with the compact K=V cache; load with "
                    "`import qkvlab.hf` or trust_remote_code=True), gpt2 (GPT2LMHeadModel: QKV, learned "
                    "positions, LayerNorm, GELU) or llama (LlamaForCausalLM: QKV/GQA, rotary, RMSNorm, SwiGLU).")
    p.add_argument("model", help="export, checkpoint or run directory, or a .safetensors file")
    p.add_argument("--format", choices=FORMATS, default="hf",
                   help="hf (default), gpt2, llama, pt2 (torch.export + AOTInductor package, --out model.pt2) "
                        "or executorch (ExecuTorch program, --out model.pte; needs the [deploy] extra)")
    p.add_argument("--max-context", type=int, default=None,
                   help="pt2/executorch: tokens the exported cache holds (default: the model's max_seq_len)")
    p.add_argument("--cache-dtype", default=None,
                   help="pt2/executorch: cache dtype fp32 (default), bf16, fp16 or int8")
    p.add_argument("--out", required=True, help="output directory (written atomically; must be new or empty)")
    p.add_argument("--force", action="store_true", help="replace an existing --out (never the source)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer written beside the weights (default: the one the model records): gpt2, "
                        "stdlib-bpe, shakespeare, ptb, bytes, a tokenizer.json or a token directory with vocab.json; "
                        "must be the recorded one when the model records one")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.format in ("pt2", "executorch"):
        if args.format == "pt2":
            from qkvlab.deploy.pt2 import export_pt2 as export_program
        else:
            from qkvlab.deploy.executorch import export_executorch as export_program

        info = export_program(args.model, args.out, args.max_context, args.cache_dtype, args.force)
        print(f"wrote {info['variant']} model ({info['bytes']:,} bytes, cache {info['cache_dtype']} of "
              f"{info['cache_bytes']:,} bytes for {info['max_context']} tokens) to {info['out']}")
        return 0
    check_output(args.out, args.force, sources=[args.model])
    from qkvlab.models import GPT
    from qkvlab.models.io import load_model
    from qkvlab.models.tokenizer import model_tokenizer

    tokenizer = model_tokenizer(args.model, args.tokenizer)  # the recorded one; --tokenizer must agree with it
    model = load_model(args.model)
    if not isinstance(model, GPT):  # a decoder
        raise QkvlabError(f"{args.model!r} holds a {model.config.kind} model; only decoders export to Hugging Face")
    from qkvlab.hf.export import export

    out = export(model, args.out, args.format, tokenizer)
    kind = {"hf": "QkvlabForCausalLM", "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[args.format]
    note = (f", tokenizer {tokenizer.name}" if tokenizer is not None
            else ", no tokenizer (the model records none; pass --tokenizer)")
    print(f"wrote {model.config.variant} model as {kind}{note} to {out}")
    return 0
