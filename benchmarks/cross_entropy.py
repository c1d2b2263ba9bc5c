"""The output layer's cross-entropy in chunks of rows (`qkvlab.nn.cross_entropy`) against `F.cross_entropy` on the
full logits, in one process, interleaved.

Each side computes the loss of `--tokens` rows of width `--width` through a (vocab, width) output layer and its
backward (the gradients of the rows and of the weight): the part of a language model's training step that the
fused path replaces. Medians over `--repeats` rounds (the order rotates every round); the chunked path at each of
`--rows` rows per chunk and at its default (`default_chunk_rows`). Peak memory is the allocations' high-water
mark of one more call of each side (resident set, `qkvlab.bench.roofline.PeakMemory`).

    python benchmarks/cross_entropy.py --threads 2                           # vocab 8,192 and 50,304, width 384
    python benchmarks/cross_entropy.py --threads 2 --vocab 128256 --width 2048 --tokens 1024 --rows 256 1024
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from qkvlab.bench.roofline import PeakMemory
from qkvlab.nn.cross_entropy import default_chunk_rows, linear_cross_entropy


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, nargs="+", default=[8192, 50304])
    p.add_argument("--width", type=int, default=384, help="the rows' width (d_model)")
    p.add_argument("--tokens", type=int, default=2048, help="rows (batch x sequence length)")
    p.add_argument("--rows", type=int, nargs="*", default=[128, 256, 1024], help="rows per chunk to time")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    for name in ("width", "tokens", "repeats", "threads"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.exit(1, f"error: --{name} must be a positive integer, got {value}\n")
    for name in ("vocab", "rows"):
        bad = [v for v in getattr(args, name) if v <= 0]
        if bad:
            p.exit(1, f"error: --{name} values must be positive integers, got {bad[0]}\n")
    return args


def peak_mib(fn) -> float:
    """What `fn()` adds to the process's memory at its peak (`qkvlab.bench.roofline.PeakMemory`: resident set on
    the CPU)."""
    with PeakMemory("cpu") as peak:
        fn()
    return peak.bytes / 2 ** 20


def sides(vocab: int, args: argparse.Namespace) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """{label: one loss forward + backward} for a vocabulary of `vocab`, and the tensors whose gradients they set."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(args.tokens, args.width, generator=g).requires_grad_()  # (N, C)
    w = (torch.randn(vocab, args.width, generator=g) / args.width ** 0.5).requires_grad_()  # (V, C)
    t = torch.randint(0, vocab, (args.tokens,), generator=g)  # (N,)

    def full() -> None:
        F.cross_entropy(h @ w.T, t).backward()

    def chunked(rows: int | None):
        return lambda: linear_cross_entropy(h, w, t, chunk_rows=rows).backward()

    out = {"F.cross_entropy, full logits": full}
    for rows in [*args.rows, None]:
        out[f"chunks of {rows} rows" if rows else f"default ({default_chunk_rows(vocab)} rows)"] = chunked(rows)
    return out, h, w


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.tokens} rows of width {args.width}, "
          f"loss forward + backward; medians of {args.repeats} interleaved rounds")
    for vocab in args.vocab:
        fns, h, w = sides(vocab, args)
        names = list(fns)
        times: dict[str, list[float]] = {k: [] for k in names}
        for r in range(args.repeats + 1):  # the first round warms up
            for k in names[r % len(names):] + names[:r % len(names)]:
                h.grad = w.grad = None
                start = time.perf_counter()
                fns[k]()
                if r:
                    times[k].append(time.perf_counter() - start)
        base = statistics.median(times[names[0]])
        print(f"\nvocab {vocab}")
        print(f"{'side':34s} {'ms':>9s} {'speed-up':>9s} {'peak MiB':>9s}")
        for k in names:
            h.grad = w.grad = None
            m = statistics.median(times[k])
            print(f"{k:34s} {m * 1e3:9.1f} {base / m:8.2f}x {peak_mib(fns[k]):9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
