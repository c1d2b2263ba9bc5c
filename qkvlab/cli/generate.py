"""`qkvlab generate MODEL --prompt TEXT`: sample from a saved decoder with the KV cache."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from qkvlab.data.tokenizer import load_tokenizer
from qkvlab.errors import QkvlabError
from qkvlab.generate import SamplingConfig, generate
from qkvlab.models.gpt import GPT
from qkvlab.models.io import load_model
from qkvlab.nn.kv_cache import QUANT_MAX, resolve_cache_dtype
from qkvlab.nn.rotary_read import unavailable


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a saved decoder with the KV cache",
                       description="Generate from a saved decoder (export, checkpoint or run directory), or "
                                   "from a model.pt2 / model.pte written by `qkvlab export --format pt2 / "
                                   "executorch` (batch 1 per prompt; a .pte runs on the ExecuTorch runtime). "
                                   "Several --prompt options generate as one batch.")
    p.add_argument("model", help="export, checkpoint or run directory, a .safetensors file, or a .pt2 / .pte export")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--tokenizer", default=None,
                   help="default: the one the model records (a given one must be it); for a model recording none: "
                        "gpt2, stdlib-bpe, shakespeare (characters), ptb (words), bytes (the fallback), "
                        "a Hugging Face tokenizer.json, or a token directory with vocab.json")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--stop", type=int, action="append", default=[], help="stop token id (repeatable)")
    p.add_argument("--prefill-chunk", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--cache-dtype", default=None,
                   help="KV-cache dtype: the model's (default), fp32, bf16, fp16, or int8 / fp8 (quantised: 1 byte "
                        "per value and a bfloat16 scale per token and head); a .pt2 / .pte keeps its export's")
    p.add_argument("--fused-rotary", action=argparse.BooleanOptionalAction, default=None,
                   help="read the KV cache in one pass (a C++ kernel on CPU float32, built on first use: needs a "
                        "C++ compiler; a Triton kernel on CUDA where triton is installed; torch.compile elsewhere): "
                        "K = V rotary keys rotated while read instead of into a rotated copy, the keys of large "
                        "caches read once (grouped heads once per group), "
                        "int8 / fp8 caches dequantised while read. Default: on on the CPU when the kernel builds "
                        "(and for int8 / fp8 caches elsewhere); --no-fused-rotary: off")
    p.add_argument("--compile", action="store_true",
                   help="decode through a torch.compile'd step over a static cache (batch 1 per prompt; on CUDA "
                        "as a CUDA graph; compiles for tens of seconds first, then each token is one graph)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def resolve_device(name: str) -> torch.device:
    """`name` as a torch device this machine has; a one-line error otherwise."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise QkvlabError(f"--device {name!r} is not a device; accepted: cpu, cuda, cuda:N, mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise QkvlabError(f"--device {name!r} is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise QkvlabError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    tok, fallback = _tokenizer(args)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, stop_tokens=tuple(args.stop), prefill_chunk=args.prefill_chunk,
                              seed=args.seed, vocab_limit=tok.vocab_size)
    if str(args.model).endswith(".pt2"):
        return _run_export(args, tok, sampling, "pt2")
    if str(args.model).endswith(".pte"):
        return _run_export(args, tok, sampling, "pte")
    cache_dtype = resolve_cache_dtype(args.cache_dtype)
    model = load_model(args.model, device)
    if not isinstance(model, GPT):
        raise QkvlabError(f"{args.model!r} holds a {model.config.kind} model; generate needs a decoder")
    if tok.vocab_size > model.config.vocab_size:
        raise QkvlabError(f"tokenizer {tok.name!r} has {tok.vocab_size} tokens but the model only "
                          f"{model.config.vocab_size}")
    prompts = [tok.encode(p) for p in args.prompt]
    if fallback:
        print(f"note: {args.model} records no tokenizer; using bytes (pass --tokenizer)", file=sys.stderr)
    start = time.perf_counter()
    if args.compile:
        outputs = _compiled(args, model, prompts, sampling, cache_dtype)
    else:
        if args.fused_rotary is None and cache_dtype in QUANT_MAX:
            why = unavailable(model.tok_emb.weight.device, model.tok_emb.weight.dtype)
            if why is not None:
                print(f"note: {args.cache_dtype} cache dequantised per step, slowly ({why})", file=sys.stderr)
        outputs = generate(model, prompts, sampling, cache_dtype=cache_dtype, fused_rotary=args.fused_rotary)
    seconds = time.perf_counter() - start
    dtype = str(cache_dtype or model.tok_emb.weight.dtype).removeprefix("torch.")
    _print(args, tok, outputs, seconds, f"{model.config.variant}, KV cache {dtype}, {torch.get_num_threads()} threads")
    return 0


def _compiled(args: argparse.Namespace, model: GPT, prompts: list[list[int]], sampling: SamplingConfig,
              cache_dtype) -> list[list[int]]:
    """`--compile`: `qkvlab.deploy.compiled.CompiledDecoder` over a cache of the longest prompt + new tokens."""
    from qkvlab.deploy.compiled import CompiledDecoder

    if args.fused_rotary:
        raise QkvlabError("--compile and --fused-rotary are two decode paths; choose one")
    longest = max((len(p) for p in prompts), default=0)
    context = longest + sampling.max_new_tokens
    if context > model.config.max_seq_len:
        raise QkvlabError(f"prompt of {longest} tokens + {sampling.max_new_tokens} new tokens exceeds the model's "
                          f"max_seq_len {model.config.max_seq_len}")
    return CompiledDecoder(model, max(context, 2), cache_dtype).generate(prompts, sampling)


def _tokenizer(args: argparse.Namespace):
    """(tokenizer, fell back): the model's recorded one (a given --tokenizer must be it), else bytes."""
    if str(args.model).endswith((".pt2", ".pte")):
        return load_tokenizer(args.tokenizer or "bytes"), False
    from qkvlab.models.tokenizer import model_tokenizer

    tok = model_tokenizer(args.model, args.tokenizer)
    return (tok, False) if tok is not None else (load_tokenizer("bytes"), True)


def _run_export(args: argparse.Namespace, tok, sampling: SamplingConfig, fmt: str) -> int:
    """Generate from a .pt2 (AOTInductor) or .pte (ExecuTorch) export, one prompt at a time (batch 1)."""
    if args.cache_dtype is not None:
        raise QkvlabError(f"--cache-dtype does not apply to a .{fmt} export (its cache dtype is fixed at export)")
    if args.fused_rotary or args.compile:
        flag = "--fused-rotary" if args.fused_rotary else "--compile"
        raise QkvlabError(f"{flag} does not apply to a .{fmt} export (it is compiled at export)")
    from qkvlab.deploy.executorch import PteRunner
    from qkvlab.deploy.pt2 import Pt2Runner, generate_with

    if fmt == "pt2":
        pt2 = Pt2Runner(args.model)

        def complete(ids: list[int]) -> list[int]:
            return generate_with(pt2.prefill, pt2.decode, pt2.empty_cache(), ids, sampling,
                                 pt2.max_context, pt2.vocab_size)
        runner: Pt2Runner | PteRunner = pt2
        label = "pt2"
    else:
        pte = PteRunner(args.model)

        def complete(ids: list[int]) -> list[int]:
            return pte.generate(ids, sampling)
        runner = pte
        label = "ExecuTorch"
    if tok.vocab_size > runner.vocab_size:
        raise QkvlabError(f"tokenizer {tok.name!r} has {tok.vocab_size} tokens but the model only "
                          f"{runner.vocab_size}")
    start = time.perf_counter()
    outputs = [complete(tok.encode(p)) for p in args.prompt]
    seconds = time.perf_counter() - start
    _print(args, tok, outputs, seconds, f"{runner.config['variant']}, {label}, cache {runner.metadata['cache_dtype']}")
    return 0


def _print(args, tok, outputs, seconds: float, what: str) -> None:
    n_new = sum(len(o) for o in outputs)
    if args.json:
        rows = [{"prompt": p, "completion": tok.decode(o), "tokens": o}
                for p, o in zip(args.prompt, outputs, strict=True)]
        print(json.dumps({"outputs": rows, "seconds": seconds, "new_tokens": n_new}, indent=2))
    else:
        for p, o in zip(args.prompt, outputs, strict=True):
            print(p + tok.decode(o))
            print("-" * 40)
        print(f"{n_new} tokens in {seconds:.2f} s ({n_new / max(seconds, 1e-9):.1f} tokens/s, {what})", file=sys.stderr)
