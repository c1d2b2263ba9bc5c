"""The one-pass cache read alone (`qkvlab.nn.kv_decode.decode`), per kind of read, against the machine's bandwidth.

Each read is one layer's call at batch B over T cached tokens of heads of 64 dims; `--layers` separate caches are
cycled so that every call reads its cache from memory, as a model's layers do. Every round times `x.sum()` over a
`--bandwidth-mib` tensor (the read bandwidth in the same minute) and then each read once, in rotating order.
Prints, per read: median ms a layer, GB/s of cache read, ns per key (per thread) and the share of `x.sum()`'s rate.
A read well below that share whatever the bandwidth is bound by its arithmetic, not by memory. With `--base REV`
the same reads also run on the kernels built from git revision REV (as benchmarks/kernel_ab.py builds them),
alternating, with base / tree ratios (above 1: the tree is faster).

    python benchmarks/cache_read.py --threads 2
    python benchmarks/cache_read.py --threads 2 --base HEAD~1 --reads tied-rotary grouped-rotary
    python benchmarks/cache_read.py --threads 2 --base HEAD~1 --cache-dtype bf16 int8

With `--cache-dtype` the caches are stored as each dtype (bf16; int8 / fp8 with a bfloat16 scale a vector) and
every read is timed over each, rows named "read@dtype"; bytes are the stored ones (scales included).

Reads (6 query heads; keys of 64 dims):
    qkv             separate keys and values, one query head a key (QKV, stored rotated)
    gqa             separate keys and values, three query heads a key (GQA-2, stored rotated)
    tied-learned    one K = V stream read as stored, one query head a key (Q-K=V, learned positions)
    tied-rotary     one K = V stream rotated while read, one query head a key (Q-K=V, rotary)
    grouped-rotary  K = V rotated while read, three query heads a key (Q-GQA-2, rotary)
    mqa-rotary      K = V rotated while read, six query heads on one key head (Q-MQA, rotary)
    grouped-learned K = V read as stored, three query heads a key (Q-GQA-2, learned positions)
    mqa-learned     K = V read as stored, six query heads on one key head (Q-MQA, learned positions)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from kernel_ab import build_base  # benchmarks/, on the path when this script runs

from qkvlab.nn import kv_decode
from qkvlab.nn.kv_cache import quantize

HEADS, DIM = 6, 64
READS = {  # name: (key heads, query heads a key, rotary, separate values)
    "qkv": (6, 1, False, True),
    "gqa": (2, 3, False, True),
    "tied-learned": (6, 1, False, False),
    "tied-rotary": (6, 1, True, False),
    "grouped-rotary": (2, 3, True, False),
    "mqa-rotary": (1, 6, True, False),
    "grouped-learned": (2, 3, False, False),
    "mqa-learned": (1, 6, False, False),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reads", nargs="+", default=list(READS), choices=list(READS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--context", type=int, default=8192, help="cached tokens")
    p.add_argument("--layers", type=int, default=6, help="separate caches, cycled")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--bandwidth-mib", type=int, default=64)
    p.add_argument("--base", help="git revision whose kernels run beside the tree's")
    p.add_argument("--cache-dtype", nargs="+", default=["fp32"], choices=["fp32", "bf16", "int8", "fp8"],
                   help="how the caches are stored (each timed)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    for name in ("batch", "context", "layers", "rounds", "bandwidth_mib"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def rotation_table(T: int, D: int) -> torch.Tensor:
    """(T, D): each pair's (cos, sin) at its two dims, as `Rotary.read_table` lays it out."""
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)  # (D/2,)
    angles = torch.arange(T).float()[:, None] * inv  # (T, D/2)
    return torch.stack([angles.cos(), angles.sin()], -1).reshape(T, D).contiguous()


def stored(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x as a cache of `dtype` stores it: (values, bfloat16 scales or None)."""
    if dtype == "fp32":
        return x, None
    if dtype == "bf16":
        return x.bfloat16(), None
    return quantize(x, torch.int8 if dtype == "int8" else torch.float8_e4m3fn)


def make_read(name: str, B: int, T: int, layers: int, rot: torch.Tensor,
              dtype: str = "fp32") -> tuple[Callable[[], None], int, int]:
    """(one pass over every layer's cache, cache bytes a layer, keys a layer)."""
    H, G, rotary, separate = READS[name]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, G, DIM, generator=gen) * DIM ** -0.5  # (B, H_kv, G, D)
    q_swap = torch.randn(B, H, G, DIM, generator=gen) * DIM ** -0.5 if rotary else None
    keys = [stored(torch.randn(B, H, T, DIM, generator=gen), dtype) for _ in range(layers)]  # (B, H_kv, T, D) each
    values = [stored(torch.randn(B, H, T, DIM, generator=gen), dtype) for _ in range(layers)] if separate else None

    def run() -> None:
        for i in range(layers):
            (k, ks), (v, vs) = keys[i], (None, None) if values is None else values[i]
            kv_decode.decode(q, q_swap, k, rot if rotary else None, None, ks, values=v, value_scales=vs)

    k, ks = keys[0]
    per_layer = (k.numel() * k.element_size() + (0 if ks is None else ks.numel() * 2)) * (2 if separate else 1)
    return run, per_layer, B * H * T


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    tree = kv_decode.library()
    libraries = {"tree": tree}
    with tempfile.TemporaryDirectory() as tmp:
        if args.base:
            libraries = {"base": build_base(args.base, Path(tmp)), "tree": tree}
        rot = rotation_table(args.context, DIM)
        reads = {name if dtype == "fp32" else f"{name}@{dtype}": make_read(name, args.batch, args.context, args.layers,
                                                                          rot, dtype)
                 for name in args.reads for dtype in args.cache_dtype}
        probe = torch.randn(args.bandwidth_mib * 2 ** 20 // 4)
        times: dict[tuple[str, str], list[float]] = {(r, lib): [] for r in reads for lib in libraries}
        rates: list[float] = []
        order = [(r, lib) for r in reads for lib in libraries]
        for _, lib in order[:len(libraries)]:  # warm-up: builds, first touches
            kv_decode.library = lambda lib=libraries[lib]: lib
            for run, _, _ in reads.values():
                run()
        for k in range(args.rounds):
            start = time.perf_counter()
            probe.sum()
            rates.append(probe.numel() * 4 / (time.perf_counter() - start))
            for r, lib in order[k % len(order):] + order[:k % len(order)]:
                kv_decode.library = lambda lib=libraries[lib]: lib
                start = time.perf_counter()
                reads[r][0]()
                times[(r, lib)].append((time.perf_counter() - start) / args.layers)
        kv_decode.library = lambda: tree
    bandwidth = statistics.median(rates)
    print(f"cache read alone: batch {args.batch}, {args.context:,} cached, {args.layers} caches cycled, "
          f"{threads} threads, {args.rounds} rounds; x.sum() {bandwidth / 1e9:.1f} GB/s "
          f"(range {min(rates) / 1e9:.1f}-{max(rates) / 1e9:.1f})")
    print(f"{'read':21s} {'kernels':8s} {'ms/layer':>9s} {'GB/s':>6s} {'ns/key/thread':>14s} {'of x.sum()':>10s}"
          + ("  base/tree" if args.base else ""))
    for r, (_, nbytes, keys) in reads.items():
        for lib in libraries:
            s = statistics.median(times[(r, lib)])
            ratio = ""
            if args.base and lib == "tree":
                ratio = f"  {statistics.median(times[(r, 'base')]) / s:.3f}x"
            print(f"{r:21s} {lib:8s} {s * 1e3:9.3f} {nbytes / s / 1e9:6.1f} {s / keys * threads * 1e9:14.2f} "
                  f"{100 * nbytes / s / bandwidth:9.0f} %{ratio}")


if __name__ == "__main__":
    main()
