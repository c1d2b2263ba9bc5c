"""Cached generation vs recomputing the whole prefix each step (what the study's released code does).

Same model, same prompts, greedy; both run in one process. Prints tokens/s and the speed-up,
and checks that both produce the same tokens.

    python benchmarks/generation.py --variant Q-K=V --prompt-len 256 --new-tokens 64
"""

from __future__ import annotations

import argparse
import time

import torch

from qkvlab.generate import SamplingConfig, generate
from qkvlab.models import ModelConfig, build_model


@torch.inference_mode()
def recompute_greedy(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy decoding without a cache: every step runs the full prefix (rows of equal length)."""
    idx = torch.tensor(prompts)  # (B, T)
    for _ in range(n):
        nxt = model(idx)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        idx = torch.cat([idx, nxt], dim=1)
    return idx[:, len(prompts[0]):].tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="Q-K=V")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig(variant=args.variant, n_layers=args.layers, d_model=args.d_model, n_heads=args.heads,
                      vocab_size=args.vocab, max_seq_len=args.prompt_len + args.new_tokens)
    model = build_model(cfg).eval()
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt_len)).tolist()
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0)
    generate(model, prompts, SamplingConfig(max_new_tokens=2, temperature=0))  # warm-up
    t0 = time.perf_counter()
    cached = generate(model, prompts, sampling)
    t_cached = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = recompute_greedy(model, prompts, args.new_tokens)
    t_naive = time.perf_counter() - t0
    n = args.batch * args.new_tokens
    print(f"{args.variant}: {args.layers} layers, d_model {args.d_model}, batch {args.batch}, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, {torch.get_num_threads()} threads")
    print(f"cached     {n / t_cached:9.1f} tokens/s  ({t_cached:.2f} s, prefill included)")
    print(f"recompute  {n / t_naive:9.1f} tokens/s  ({t_naive:.2f} s)")
    print(f"speed-up   {t_naive / t_cached:9.2f}x   same tokens: {cached == naive}")


if __name__ == "__main__":
    main()
