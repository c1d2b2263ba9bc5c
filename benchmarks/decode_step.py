"""The native decode step against the per-layer path, on the same model and cache, interleaved.

Every side decodes one new token per row on the same cached tokens (the cache is rewound after each step) through
the one-pass cache read (`fused_rotary=True`): "whole" runs the step in one native call, token ids to logits (the
default, `qkvlab.nn.decode_step.decode_tokens`), "blocks" runs only the blocks natively and the embeddings, final
norm and output layer as modules (`decode_step.whole_step = False`), "per-layer" runs the blocks as modules
(`decode_step.enabled = False`). Prints medians, per-layer / whole and blocks / whole (above 1: whole is faster).

    python benchmarks/decode_step.py --threads 2                 # 6 layers d_model 384 and 2 layers d_model 128
    python benchmarks/decode_step.py --variants Q-K=V --contexts 8192 --batches 4 --rounds 21
"""

from __future__ import annotations

import argparse

import torch
from qkv_vs_tied import decode_step_fn  # benchmarks/, on the path when this script runs

from qkvlab.arch import ModelConfig
from qkvlab.bench.peers import interleaved
from qkvlab.errors import QkvlabError
from qkvlab.models.gpt import GPT
from qkvlab.nn import decode_step

SIZES = {"small": dict(n_layers=6, d_model=384, n_heads=6), "tiny": dict(n_layers=2, d_model=128, n_heads=4)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--variants", nargs="+", default=["QKV", "Q-K=V", "Q-MQA"])
    p.add_argument("--positions", nargs="+", default=["rotary", "learned"])
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 8192])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds (each times both sides once)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    for name in ("contexts", "batches"):
        bad = [v for v in getattr(args, name) if v <= 0]
        if bad:
            raise SystemExit(f"decode_step.py: --{name} must be positive integers, got {bad[0]}")
    if args.rounds <= 0 or (args.threads is not None and args.threads <= 0):
        raise SystemExit(f"decode_step.py: --rounds and --threads must be positive, got {args.rounds} and "
                         f"{args.threads}")
    return args


MODES = {"per-layer": (False, False), "blocks": (True, False), "whole": (True, True)}  # (enabled, whole_step)


def step_fn(model: GPT, batch: int, context: int, mode: str):
    """One decode step on `context` cached random tokens (qkv_vs_tied's step) in one of MODES."""
    step, _ = decode_step_fn(model, batch, context, model.config.vocab_size, fused=True)

    def toggled() -> None:
        decode_step.enabled, decode_step.whole_step = MODES[mode]
        step()
    return toggled


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.rounds} interleaved rounds")
    print(f"{'size':6} {'positions':9} {'variant':8} {'batch':>5} {'context':>7} {'per-layer ms':>12} "
          f"{'blocks ms':>9} {'whole ms':>8} {'per-layer/whole':>15} {'blocks/whole':>12}")
    for size in args.sizes:
        for positions in args.positions:
            for variant in args.variants:
                try:
                    cfg = ModelConfig(variant=variant, positions=positions, vocab_size=8192,
                                      max_seq_len=max(args.contexts) + 1, **SIZES[size])
                except QkvlabError as err:
                    raise SystemExit(f"decode_step.py: {err}") from None
                model = GPT(cfg, seed=0).eval()
                for batch in args.batches:
                    for context in args.contexts:
                        fns = {mode: step_fn(model, batch, context, mode) for mode in MODES}
                        for fn in fns.values():
                            fn()  # warm-up (builds the kernels on first use)
                        t = interleaved(fns, args.rounds, torch.device("cpu"))
                        print(f"{size:6} {positions:9} {variant:8} {batch:5d} {context:7d} "
                              f"{t['per-layer'] * 1e3:12.2f} {t['blocks'] * 1e3:9.2f} {t['whole'] * 1e3:8.2f} "
                              f"{t['per-layer'] / t['whole']:14.2f}x {t['blocks'] / t['whole']:11.2f}x", flush=True)
    decode_step.enabled, decode_step.whole_step = MODES["whole"]


if __name__ == "__main__":
    main()
