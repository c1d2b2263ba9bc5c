"""The few-row linear kernel (`qkvlab.nn.linear`) against PyTorch's `F.linear`, in one process, interleaved.

Two parts, medians over `--repeats` rounds (the order alternates every round):

1. each weight shape of a decode step (fused projection, output projection, MLP in and out, LM head) at each
   `--rows` count: microseconds per call and the weight's read rate (bytes / time), cycling through copies of
   the weight that exceed the CPU's caches together (a decode step reads its weights from memory);
2. whole decode steps of the model (one token per row on `--context` cached tokens, the cache rewound after
   every step) with `qkvlab.nn.linear.enabled` True and False: the same model, cache and weights.

    python benchmarks/small_linear.py --threads 2                       # 6 layers, d_model 384, 6 heads
    python benchmarks/small_linear.py --threads 2 --layers 2 --d-model 128 --heads 4 --context 512 --rows 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from qkvlab.models import ModelConfig, build_model
from qkvlab.nn import linear


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="QKV")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--positions", default="learned", choices=["learned", "rotary"])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4], help="rows per call (the decode batch)")
    p.add_argument("--context", type=int, default=512, help="tokens cached before each timed decode step")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args()


def elapsed_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def interleaved(sides: dict, repeats: int) -> dict:
    """{name: median ms} of each side's callable, timed in alternating order every round."""
    names = list(sides)
    times: dict = {k: [] for k in names}
    for r in range(repeats):
        for k in names if r % 2 == 0 else names[::-1]:
            times[k].append(elapsed_ms(sides[k]))
    return {k: statistics.median(v) for k, v in times.items()}


def time_weight(w: torch.Tensor, rows: int, repeats: int) -> tuple[float, float]:
    """(F.linear us, kernel us) per call of `rows` rows against a weight of `w`'s shape, cycling through copies
    of it that together exceed the CPU's caches (as a decode step's weights do), so the weight comes from
    memory."""
    copies = [torch.randn_like(w) for _ in range(max(2, (96 << 20) // (w.numel() * 4)))]
    x = torch.randn(rows, w.shape[1])
    with torch.no_grad():
        assert torch.allclose(linear.small_linear(x, w, None), F.linear(x, w), atol=1e-3)
        ms = interleaved({"torch": lambda: [F.linear(x, c) for c in copies],
                          "kernel": lambda: [linear.small_linear(x, c, None) for c in copies]}, repeats)
    return ms["torch"] * 1e3 / len(copies), ms["kernel"] * 1e3 / len(copies)


def time_decode(model, rows: int, context: int, vocab: int, repeats: int) -> tuple[float, float]:
    """(ms with F.linear, ms with the kernel) of one decode step of `rows` rows on `context` cached tokens."""
    cache = model.make_cache(rows, context + 1)
    with torch.no_grad():
        for start in range(0, context, 512):
            model(torch.randint(0, vocab, (rows, min(512, context - start))), cache)
        token = torch.randint(0, vocab, (rows, 1))

        def step(on: bool) -> None:
            linear.enabled = on
            model(token, cache)
            cache.set_lengths([context] * rows)

        step(True), step(False)  # warm-up
        ms = interleaved({"off": lambda: step(False), "on": lambda: step(True)}, repeats)
    linear.enabled = True
    return ms["off"], ms["on"]


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(variant=args.variant, n_layers=args.layers, d_model=args.d_model, n_heads=args.heads,
                      vocab_size=args.vocab, max_seq_len=args.context + 1, positions=args.positions)
    model = build_model(cfg).eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.variant}, {args.layers} layers, "
          f"d_model {args.d_model}, {args.heads} heads, vocab {args.vocab}; medians of {args.repeats} rounds")
    shapes = {name: m.weight for name, m in model.named_modules() if isinstance(m, linear.Linear)
              and (".0." in name or name == "lm_head")}  # the first block's and the head
    print(f"\n{'weight':40s} {'rows':>4s} {'F.linear us':>12s} {'kernel us':>10s} {'GB/s':>6s} {'speed-up':>8s}")
    for name, w in shapes.items():
        for rows in args.rows:
            a, b = time_weight(w, rows, args.repeats)
            print(f"{name + ' ' + str(tuple(w.shape)):40s} {rows:4d} {a:12.1f} {b:10.1f} "
                  f"{w.numel() * 4 / b / 1e3:6.1f} {a / b:7.2f}x")
    print(f"\nwhole decode step, {args.context} cached tokens")
    print(f"{'rows':>4s} {'F.linear ms':>12s} {'kernel ms':>10s} {'speed-up':>8s}")
    for rows in args.rows:
        off, on = time_decode(model, rows, args.context, args.vocab, args.repeats)
        print(f"{rows:4d} {off:12.2f} {on:10.2f} {off / on:7.2f}x")


if __name__ == "__main__":
    main()
