"""One attention layer's decode step on a long cache: what reading rotary K = V keys costs, by rotary fraction.

With K = V and rotary positions the cache holds unrotated keys, so every decode step rotates the
cached keys of each layer before attention. With partial rotary (`rotary_fraction` < 1) only the
first rotary_dim dims of each key are rotated (into a workspace of that width); the other dims are
read from the cache in place (`Attention._split_keys`). This times one layer alone (projection,
cache write, rotation, attention, output projection), interleaved, medians, so that the rest of
a model does not hide the read. "(concat)" rows force the other path (rotate the slice, then
concatenate it with the unrotated dims: a copy of those dims) to show what the split read saves;
"(fused)" rows read through `qkvlab.nn.rotary_read` (keys rotated inside a compiled score loop, no workspace).

    python benchmarks/rotary_read.py                       # 8 heads of 64, batch 4, 2048 cached
    python benchmarks/rotary_read.py --variants QKV Q-K=V Q-MQA --fractions 1 0.5 0.25 --context 8192
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qkvlab.nn.attention import Attention, AttentionContext
from qkvlab.nn.kv_cache import KVCache
from qkvlab.nn.positions import Rotary
from qkvlab.variants import parse_variant


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["QKV", "Q-K=V"], help="first one (at fraction 1) is the baseline")
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25], help="rotary fractions")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--context", type=int, default=2048, help="tokens already in the cache")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--no-concat", action="store_true", help="skip the (concat) rows of K = V variants")
    p.add_argument("--no-fused", action="store_true", help="skip the (fused) rows of K = V variants")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args()


def layer_step(variant: str, fraction: float, args: argparse.Namespace, concat: bool = False, fused: bool = False):
    """A decode step of one attention layer on a cache of `args.context` random tokens; (step, cache)."""
    H, D, B, n = args.heads, args.head_dim, args.batch, args.context
    R = round(fraction * D)
    torch.manual_seed(0)
    attn = Attention(H * D, H, variant, causal=True, rotary=Rotary(D, n + 1, rotary_dim=R)).eval()
    if concat:
        attn._split_read = lambda n_queries, rotary_dim: False  # type: ignore[method-assign]
    cache = KVCache(1, B, attn.n_kv_heads, D, n + 1, attn.spec.cache_streams, fused_rotary=fused)
    for buffer in cache.buffers:
        buffer[:, :, :, :n].normal_()
    cache.set_lengths([n] * B)
    x = torch.randn(B, 1, H * D)  # (B, 1, C)

    @torch.inference_mode()
    def step():  # the new token is written at position n every time; lengths never advance
        ctx = AttentionContext(q_pos=cache.positions(1, "cpu"), k_len=n + 1, is_causal=False, cache=cache)
        attn(x, ctx)
    return step, cache


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps, caches = {}, {}
    for v in args.variants:
        for f in args.fractions:
            shared = parse_variant(v).cache_streams == 1  # K = V: keys rotated when read
            for concat in (False, True) if shared and f < 1 and not args.no_concat else (False,):
                name = f"{v} @{f:g}" + (" (concat)" if concat else "")
                steps[name], caches[name] = layer_step(v, f, args, concat)
            if shared and not args.no_fused:
                steps[f"{v} @{f:g} (fused)"], caches[f"{v} @{f:g} (fused)"] = layer_step(v, f, args, fused=True)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for fn in steps.values():  # warm-up (and the fused read's compilation)
        fn()
        fn()
    for _ in range(args.repeats):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    base = next(iter(steps))
    width = max(map(len, steps))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; one attention layer, {args.heads} heads "
          f"of {args.head_dim}, batch {args.batch}, 1 new token on {args.context} cached tokens; "
          f"median of {args.repeats} interleaved runs")
    print(f"{'layer':<{width}} {'step ms':>9} {'ratio':>7} {'cache MiB':>10} {'workspace MiB':>14}")
    for name in steps:
        cache = caches[name]
        print(f"{name:<{width}} {med[name]:>9.3f} {med[name] / med[base]:>7.3f} {cache.nbytes / 2**20:>10.2f} "
              f"{cache.workspace_nbytes / 2**20:>14.2f}")


if __name__ == "__main__":
    main()
