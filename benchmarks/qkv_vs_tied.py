"""QKV vs Q-K=V on the same model: a training step and a decode step at a long context.

Both variants are built in one process and timed interleaved (ABAB...), so machine noise hits
both alike; the script prints medians and the ratio Q-K=V / QKV (below 1 = Q-K=V faster).

    python benchmarks/qkv_vs_tied.py                     # defaults: 6 layers, d 512, 8 heads
    python benchmarks/qkv_vs_tied.py --positions rotary --context 4096 --variants QKV Q-K=V Q-MQA
    python benchmarks/qkv_vs_tied.py --positions rotary --rotary-fraction 1 0.5 0.25 --no-train
    python benchmarks/qkv_vs_tied.py --positions rotary --rotary-values off on --fused-rotary --no-train

With several `--rotary-fraction` values every variant is built at each (rows "Q-K=V @0.25"), and with
`--rotary-values off on` with and without rotary values (rows "Q-K=V rv": values turned by their positions,
K = V stored rotated; `ModelConfig.rotary_values`); the first row is the baseline. "workspace MiB" is the K = V
rotary workspace (one layer's rotated keys).

Each decode row is also set against this machine's roofline, as `qkvlab bench` does (`qkvlab.bench.peers`):
"% bound" = (weights + cache bytes) / read bandwidth / step time, the bandwidth that of `x.sum()` over
`--bandwidth-mib` MiB; "% roof" = the longer of that time and the step's FLOPs (`decode_flops`: projections, MLP,
LM head, scores and weighted sums; not norms, softmax or rotations) at `torch.mm`'s FLOP/s on a 1024-square GEMM,
over the step time; both probes timed in the same interleaved rounds as the steps. Where the FLOPs take longer
than the bytes, the step is bound by arithmetic and the memory bound is out of its reach on this machine.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time

import torch

from qkvlab.bench.peers import ROOF_GEMM, decode_roofline, weight_bytes
from qkvlab.errors import QkvlabError
from qkvlab.models import ModelConfig, build_model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["QKV", "Q-K=V"], help="first one is the baseline")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--positions", default="learned", choices=["learned", "rotary"])
    p.add_argument("--rotary-fraction", type=float, nargs="+", default=[1.0], metavar="F",
                   help="share of each head's dims that rotate (partial rotary; needs --positions rotary)")
    p.add_argument("--rotary-values", nargs="+", choices=["off", "on"], default=["off"],
                   help="build each variant without and/or with rotary values (needs --positions rotary)")
    p.add_argument("--no-train", action="store_true", help="time the decode step only")
    p.add_argument("--fused-rotary", action="store_true",
                   help="also decode each model through the one-pass cache read (a '(fused)' row; a layer's "
                        "unrotated float keys take it from 2 MiB, grouped ones from 512 KiB)")
    p.add_argument("--cache-dtypes", nargs="+", default=["fp32"], metavar="DTYPE",
                   help="decode with each of these cache dtypes (fp32, bf16, int8, fp8; rows named by dtype)")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-len", type=int, default=256)
    p.add_argument("--context", type=int, default=2048, help="tokens already in the cache when decoding")
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--bandwidth-mib", type=int, default=512,
                   help="size of the x.sum() read-bandwidth probe (0: no roofline columns)")
    return p.parse_args()


def train_step_fn(model, batch: int, length: int, vocab: int):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, vocab, (batch, length + 1))

    def step():
        logits = model(idx[:, :-1])  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def decode_step_fn(model, batch: int, context: int, vocab: int, fused: bool = False, dtype: str | None = None):
    """One new token per row on top of `context` cached tokens (the cache is rewound each call)."""
    cache = model.make_cache(batch, max_len=context + 1, dtype=dtype, fused_rotary=fused)
    with torch.inference_mode():
        for start in range(0, context, 512):  # fill the cache in chunks
            model(torch.randint(0, vocab, (batch, min(512, context - start))), cache)
    token = torch.randint(0, vocab, (batch, 1))

    @torch.inference_mode()
    def step():
        cache.set_lengths([context] * batch)
        model(token, cache)
    return step, cache


def timed(fn, repeats_box: list[float]) -> None:
    start = time.perf_counter()
    fn()
    repeats_box.append(time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    if args.bandwidth_mib < 0:
        raise SystemExit(f"qkv_vs_tied.py: --bandwidth-mib {args.bandwidth_mib} must be 0 (no roofline) or MiB > 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    max_len = max(args.context + 1, args.train_len)
    fractions = args.rotary_fraction
    models = {}
    for v in args.variants:
        for f in fractions:
            for turned in dict.fromkeys(args.rotary_values):
                torch.manual_seed(0)
                try:
                    cfg = ModelConfig(variant=v, n_layers=args.layers, d_model=args.d_model, n_heads=args.heads,
                                      vocab_size=args.vocab, max_seq_len=max_len, positions=args.positions,
                                      rotary_fraction=f, rotary_values=turned == "on")
                except QkvlabError as err:
                    raise SystemExit(f"qkv_vs_tied.py: {err}") from None
                name = (v if fractions == [1.0] else f"{v} @{f:g}") + (" rv" if turned == "on" else "")
                models[name] = build_model(cfg)
    names = list(models)
    kinds = ("decode",) if args.no_train else ("train", "decode")
    train = {} if args.no_train else {
        v: train_step_fn(m.train(), args.train_batch, args.train_len, args.vocab) for v, m in models.items()}
    decode, nbytes, workspace, of = {}, {}, {}, {}
    for v, m in models.items():
        for dtype in args.cache_dtypes:  # every model's cache takes the read (small unrotated ones keep SDPA)
            fused = (False, True) if args.fused_rotary else (False,)
            for f in fused:
                name = v + (f" {dtype}" if args.cache_dtypes != ["fp32"] else "") + (" (fused)" if f else "")
                decode[name], cache = decode_step_fn(m.eval(), args.decode_batch, args.context, args.vocab, f, dtype)
                decode[name]()  # the fused read compiles on its first call
                nbytes[name], workspace[name], of[name] = cache.nbytes, cache.workspace_nbytes, v
    rows = list(decode)
    times: dict[tuple[str, str], list[float]] = {(kind, v): [] for kind in kinds for v in rows}
    try:
        probe = torch.ones(args.bandwidth_mib * 2 ** 20 // 4) if args.bandwidth_mib > 0 else None  # (N,) float32
    except RuntimeError as err:  # more than the machine can allocate
        raise SystemExit(f"qkv_vs_tied.py: --bandwidth-mib {args.bandwidth_mib}: {str(err).splitlines()[0]}") from None
    roof_a, roof_b = torch.randn(ROOF_GEMM[:2]), torch.randn(ROOF_GEMM[1:])  # the compute roof's GEMM: (m, k) @ (k, n)
    for fn_map in (train, decode):  # warm-up
        for fn in fn_map.values():
            fn()
    for _ in range(args.repeats):
        for v in names if train else ():
            models[v].train()
            timed(train[v], times["train", v])
        for v in rows:
            models[of[v]].eval()
            timed(decode[v], times["decode", v])
        if probe is not None:  # this VM's bandwidth and FLOP/s move between runs: both timed in the same rounds
            timed(probe.sum, times.setdefault(("probe", "x.sum()"), []))
            timed(functools.partial(torch.mm, roof_a, roof_b), times.setdefault(("probe", "mm"), []))
    base = names[0]
    width = max(10, *map(len, rows))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.layers} layers, d_model "
          f"{args.d_model}, {args.heads} heads, {args.positions} positions; median of {args.repeats} interleaved runs")
    if train:
        print(f"train step: batch {args.train_batch} x {args.train_len} tokens (forward + backward + AdamW)")
    print(f"decode step: batch {args.decode_batch}, 1 new token on {args.context} cached tokens")
    med = {key: statistics.median(vals) * 1e3 for key, vals in times.items()}
    read_bw = probe.numel() * 4 / med["probe", "x.sum()"] * 1e3 if probe is not None else None  # bytes/s
    roof = 2 * math.prod(ROOF_GEMM) / med["probe", "mm"] * 1e3 if probe is not None else None  # FLOP/s
    if read_bw and roof:
        print(f"roofline: read {read_bw / 1e9:.1f} GB/s (x.sum() over {args.bandwidth_mib} MiB, in the same rounds), "
              f"compute {roof / 1e9:.1f} GFLOP/s (torch.mm at {'x'.join(map(str, ROOF_GEMM))})")
    head = f"{'variant':<{width}}"
    if train:
        head += f" {'train ms':>10} {'ratio':>7}"
    head += f" {'decode ms':>10} {'ratio':>7} {'cache MiB':>10} {'ratio':>7}"
    show_ws = any(workspace.values())
    print(head + (f" {'workspace MiB':>14}" if show_ws else "") + (f" {'% bound':>8} {'% roof':>7}" if read_bw else ""))
    for v in rows:
        row = f"{v:<{width}}"
        if train:
            m = of[v]
            row += f" {med['train', m]:>10.1f} {med['train', m] / med['train', base]:>7.3f}"
        row += (f" {med['decode', v]:>10.2f} {med['decode', v] / med['decode', rows[0]]:>7.3f} "
                f"{nbytes[v] / 2**20:>10.1f} {nbytes[v] / nbytes[rows[0]]:>7.3f}")
        row += f" {workspace[v] / 2**20:>14.2f}" if show_ws else ""
        if read_bw and roof:
            config = models[of[v]].config
            shares = decode_roofline(config, weight_bytes(config) + nbytes[v], args.decode_batch, args.context,
                                     med["decode", v] / 1e3, read_bw, roof)
            row += f" {shares['pct_memory_bound']:>7.0f}% {shares['pct_roofline']:>6.0f}%"
        print(row)


if __name__ == "__main__":
    main()
