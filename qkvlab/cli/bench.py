"""`qkvlab bench`: our decoders against Hugging Face (and litgpt) side by side, with roofline utilisation.

The measuring code is `qkvlab.bench.peers`; `benchmarks/peers.py` runs the same thing from a checkout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qkvlab.atomic import check_output
from qkvlab.errors import check

DESCRIPTION = ("Our decoders against Hugging Face GPT2LMHeadModel (SDPA) and LlamaForCausalLM, and litgpt's GPT "
               "when importable, all built from the same config with random weights, in one process: training "
               "step, prefill and decode step at each (batch, context), interleaved repeats, medians, peak memory; "
               "decode against the memory-bandwidth bound and training against the matmul peak, both measured in "
               "the same process. The peers need `pip install qkvlab[bench]`; a missing peer is reported and skipped.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (defaults: `qkvlab.bench.peers.BenchSettings`)."""
    p.add_argument("--shapes", nargs="+", metavar="NAME",
                   help="gpt2 (QKV, Q-K=V), llama (GQA-2, Q-GQA-2); default both")
    p.add_argument("--peers", nargs="*", metavar="NAME", help="hf, litgpt (default both; none: ours only)")
    p.add_argument("--phases", nargs="+", metavar="NAME", help="train, prefill, decode (default all)")
    p.add_argument("--layers", type=int, help="layers (default 6)")
    p.add_argument("--d-model", type=int, help="model width (default 384)")
    p.add_argument("--heads", type=int, help="query heads (default 6)")
    p.add_argument("--vocab", type=int, help="vocabulary (default 8192)")
    p.add_argument("--d-mlp", type=int, help="SwiGLU width of the llama shape (default 1024)")
    p.add_argument("--train-batch", type=int, help="training batch (default 8)")
    p.add_argument("--train-len", type=int, help="training sequence length (default 256)")
    p.add_argument("--prefill-len", type=int, help="prompt tokens per row (default 512)")
    p.add_argument("--contexts", type=int, nargs="+", metavar="N", help="cached tokens for decode (default 512 2048)")
    p.add_argument("--batches", type=int, nargs="+", metavar="B", help="batch sizes for prefill and decode "
                                                                      "(default 1 4)")
    p.add_argument("--repeats", type=int, help="interleaved repeats per measurement (default 5)")
    p.add_argument("--bandwidth-mib", type=int, help="tensor size for the read-bandwidth measurement (default 512)")
    p.add_argument("--max-cache-gib", type=float, help="skip a decode cell whose caches (all models together) "
                                                       "exceed this (default 8)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--device", help="cpu (default) or cuda[:N]")
    p.add_argument("--seed", type=int, help="weights and tokens (default 0)")
    p.add_argument("--fused-rotary", action="store_true", default=None,
                   help="also time our variants decoding through the one-pass cache read (qkvlab.nn.rotary_read: "
                        "K = V rotary keys rotated while read, large caches read once), as '(fused)' rows")
    p.add_argument("--rotary-values", action="store_true", default=None,
                   help="also time the llama shape's Q-GQA-2 with rotary values (model.rotary_values: its K = V cache "
                        "read with no rotation), as a '(rotary values)' row of ours")
    p.add_argument("--train-dtype", help="float32 (default) or bfloat16: every contender's training step under "
                                         "bf16 autocast (what train.dtype=auto picks on a CPU with bf16 hardware)")
    p.add_argument("--train-loss", help="native (default: each library's own training loss; ours without the full "
                                        "logits) or common (F.cross_entropy on every contender's full logits)")
    p.add_argument("--json", metavar="PATH", help="also write the full report as JSON (checked before measuring)")
    p.add_argument("--force", action="store_true", help="replace an existing --json file")


_FIELDS = ("shapes", "peers", "phases", "layers", "d_model", "heads", "vocab", "d_mlp", "train_batch", "train_len",
           "prefill_len", "contexts", "batches", "repeats", "bandwidth_mib", "max_cache_gib", "device", "seed",
           "fused_rotary", "rotary_values", "train_dtype", "train_loss")


def run(args: argparse.Namespace) -> int:
    """Build the settings (one-line errors for bad values), measure, print, write JSON if asked."""
    import torch

    from qkvlab.bench.peers import BenchSettings, write_json
    from qkvlab.bench.peers import run as run_bench

    given = {name: getattr(args, name) for name in _FIELDS if getattr(args, name) is not None}
    for name in ("shapes", "peers", "phases", "contexts", "batches"):
        if name in given:
            given[name] = tuple(given[name])
    settings = BenchSettings(**given)
    if args.json:  # checked before minutes of measuring: never overwritten unasked, never a directory
        check(not Path(args.json).expanduser().is_dir(), f"--json {args.json} is a directory; give a file path")
        check_output(args.json, args.force, flag="--json")
    check(args.threads is None or args.threads > 0, f"--threads must be a positive integer, got {args.threads}")
    if settings.device != "cpu":
        check(torch.cuda.is_available(), f"--device {settings.device}: CUDA is not available here")
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run_bench(settings)
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="our models against Hugging Face / litgpt: speed, memory, roofline",
                              description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=run)
