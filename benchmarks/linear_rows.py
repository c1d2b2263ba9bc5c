"""How many rows the few-row linear kernel should take: it against F.linear by rows, and whole decode steps at larger
batches with the kernel's row limit at 8 (`linear.MIN_ROWS`) or at this CPU's (`linear.max_rows()`: 128 on AMD).

1. The kernel (`qkvlab.nn.linear.small_linear`) and F.linear (PyTorch's BLAS) on the weights of a six-layer
   d_model 384 decoder (six copies of each, so they come from memory), at each row count, interleaved.
2. One-token decode steps (the default path: the one-pass cache read and the native step) of `--batches` rows on
   `--contexts` cached tokens, GPT-2 shape (QKV, Q-K=V) and Llama shape (GQA-2, Q-GQA-2), the row limit at 8
   or this CPU's, alternating in one process; above 1: this CPU's limit is faster.

    python benchmarks/linear_rows.py --threads 2
    python benchmarks/linear_rows.py --threads 2 --base HEAD~1 --rows 8 16 64   # the kernel of another revision
    python benchmarks/linear_rows.py --threads 2 --rows 8 16 32 --batches 16 --contexts 512
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from qkvlab.bench.peers import BenchSettings, build_contenders
from qkvlab.nn import linear

SHAPES = [(1152, 384), (384, 384), (1536, 384), (384, 1536), (2048, 384), (384, 1024), (8192, 384)]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128])
    p.add_argument("--batches", type=int, nargs="+", default=[16, 32])
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--base", help="git revision: its kernel against the tree's, by rows (instead of the steps)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    for name in ("rows", "batches", "contexts"):
        bad = [v for v in getattr(args, name) if v <= 0]
        if bad:
            p.error(f"--{name} must be positive, got {bad[0]}")
    if args.repeats <= 0:
        p.error(f"--repeats must be positive, got {args.repeats}")
    return args


def alternate(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, called in turn `repeats` times (order reversed every other round)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for k in (list(fns) if r % 2 else list(fns)[::-1]):
            start = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def kernel_against_blas(rows: list[int], repeats: int) -> None:
    weights = [[torch.randn(n, k) for _ in range(6)] for n, k in SHAPES]
    print("rows  F.linear ms  GFLOP/s  kernel ms  GFLOP/s  F.linear / kernel")
    for m in rows:
        xs = [torch.randn(m, k) for _, k in SHAPES]
        pairs = [(x, w) for ws, x in zip(weights, xs, strict=True) for w in ws]
        fns = {"blas": lambda pairs=pairs: [F.linear(x, w) for x, w in pairs],
               "kernel": lambda pairs=pairs: [linear.small_linear(x, w, None) for x, w in pairs]}
        with torch.no_grad():
            t = alternate(fns, repeats)
        flops = 2 * m * sum(n * k for n, k in SHAPES) * 6
        print(f"{m:4d}  {t['blas'] * 1e3:11.2f}  {flops / t['blas'] / 1e9:7.1f}  {t['kernel'] * 1e3:9.2f}  "
              f"{flops / t['kernel'] / 1e9:7.1f}  {t['blas'] / t['kernel']:.2f}x")


def kernel_against_base(rev: str, rows: list[int], repeats: int) -> None:
    """The tree's few-row kernel against the one built at git revision `rev`, on the same weights, alternating."""
    from kernel_ab import build_base  # benchmarks/, on the path when this script runs

    from qkvlab.nn import kv_decode

    weights = [[torch.randn(n, k) for _ in range(6)] for n, k in SHAPES]
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"base": build_base(rev, Path(tmp)), "tree": kv_decode.library()}

        def run(lib, pairs) -> None:
            for x, w in pairs:
                y = torch.empty(x.shape[0], w.shape[0])
                lib.qkvlab_small_linear(x.data_ptr(), w.data_ptr(), None, y.data_ptr(), x.shape[0], w.shape[0],
                                        w.shape[1], ctypes.c_int32(torch.get_num_threads()))

        print(f"rows  kernel at {rev} GFLOP/s  tree GFLOP/s  base / tree")
        for m in rows:
            xs = [torch.randn(m, k) for _, k in SHAPES]
            pairs = [(x, w) for ws, x in zip(weights, xs, strict=True) for w in ws]
            t = alternate({name: lambda lib=lib, pairs=pairs: run(lib, pairs) for name, lib in libs.items()}, repeats)
            flops = 2 * m * sum(n * k for n, k in SHAPES) * 6
            print(f"{m:4d}  {flops / t['base'] / 1e9:21.1f}  {flops / t['tree'] / 1e9:12.1f}  "
                  f"{t['base'] / t['tree']:.3f}x")


def decode_steps(batches: list[int], contexts: list[int], repeats: int) -> None:
    measured = linear.max_rows()
    print(f"\nrow limit on this CPU: {measured} (else {linear.MIN_ROWS})")
    print("shape  model    batch  context  limit 8 ms  this CPU's ms  speed-up")
    real = linear.max_rows
    for shape in ("gpt2", "llama"):
        settings = BenchSettings(contexts=tuple(contexts), batches=tuple(batches), fused_rotary=True)
        contenders = [c for c in build_contenders(settings, shape, {}) if c.fused_rotary]
        gen = torch.Generator().manual_seed(0)
        for B in batches:
            for L in contexts:
                for c in contenders:
                    c.model.eval()
                    with torch.inference_mode():
                        cache = c.fill(B, L, gen)
                        token = torch.randint(0, settings.vocab, (B, 1), generator=gen)

                        def step(limit, c=c, cache=cache, token=token, L=L):
                            linear.max_rows = limit
                            c.step(cache, token, L)

                        fns = {"floor": lambda: step(lambda: linear.MIN_ROWS), "cpu": lambda: step(real)}
                        for f in fns.values():
                            f()
                        t = alternate(fns, repeats)
                    linear.max_rows = real
                    print(f"{shape:6s} {c.name.removesuffix(' (fused)'):8s} {B:5d}  {L:7,d}  {t['floor'] * 1e3:10.2f}  "
                          f"{t['cpu'] * 1e3:13.2f}  {t['floor'] / t['cpu']:.2f}x")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.repeats} alternating rounds")
    if args.base:
        kernel_against_base(args.base, args.rows, args.repeats)
        return
    kernel_against_blas(args.rows, args.repeats)
    decode_steps(args.batches, args.contexts, args.repeats)


if __name__ == "__main__":
    main()
