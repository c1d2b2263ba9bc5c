"""One layer's one-token cache read on a GPU, K = V with rotary positions, by path (run it where CUDA is).

Paths, each timed on the same cache, interleaved, medians (CUDA events):
    triton     qkvlab.nn.triton_read: one pass, keys rotated as loaded (`--fused-rotary` on CUDA)
    compiled   the torch.compile score loop of qkvlab.nn.rotary_read, softmax, one matmul (two passes)
    workspace  what decoding does without the fused read: the cache rotated into a workspace, then SDPA
    qkv        SDPA over a QKV cache of the same heads (keys stored rotated, separate values): the baseline
Prints ms a layer, GB/s of cache read (the K = V tensor; QKV: keys and values) and each path's speed against
`workspace` and against `qkv`; outputs are checked against each other first.

    python benchmarks/gpu_read.py                                  # 6 heads of 64, batch 4, 8,192 cached, bf16
    python benchmarks/gpu_read.py --groups 1 3 6 --context 2048 32768 --dtype float32
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from qkvlab.nn import rotary_read, triton_read
from qkvlab.nn.positions import Rotary, apply_rotary

PATHS = ("triton", "compiled", "workspace", "qkv")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=6, help="query heads")
    p.add_argument("--groups", type=int, nargs="+", default=[1, 3, 6],
                   help="query heads a key head (1: Q-K=V, 3: Q-GQA-2 at 6 heads, 6: Q-MQA)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--context", type=int, nargs="+", default=[8192], help="cached tokens")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    for name in ("heads", "head_dim", "batch", "repeats"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for n in args.context:
        if n <= 0:
            p.error(f"--context must be positive, got {n}")
    for g in args.groups:
        if g <= 0 or args.heads % g:
            p.error(f"--groups {g}: must divide --heads {args.heads}")
    if args.head_dim % 2:
        p.error(f"--head-dim must be even (rotary pairs), got {args.head_dim}")
    return args


def make_paths(B: int, H: int, G: int, D: int, T: int, dtype: torch.dtype,
               device: torch.device) -> tuple[dict[str, Callable[[], torch.Tensor]], dict[str, int]]:
    """{path: one layer's read returning (B, H, 1, D)}, {path: cache bytes it reads}."""
    H_kv = H // G
    gen = torch.Generator().manual_seed(0)
    rotary = Rotary(head_dim=D, max_len=T + 1)
    q = torch.randn(B, H, 1, D, generator=gen).to(device, dtype)  # rotated to its position already
    kv = torch.randn(B, H_kv, T, D, generator=gen).to(device, dtype)  # K = V, unrotated
    rot = rotary.read_table(T, device, dtype)  # (T, D)
    cis = rotary.tables(torch.arange(T, device=device))  # (T, D/2) complex
    workspace = torch.empty(B, H_kv, T, D // 2, dtype=cis.dtype, device=device)  # as KVCache keeps one
    keys = torch.randn(B, H, T, D, generator=gen).to(device, dtype)  # QKV: stored rotated
    values = torch.randn(B, H, T, D, generator=gen).to(device, dtype)
    qg = (q * D ** -0.5).reshape(B, H_kv, G, D)

    def triton() -> torch.Tensor:
        return triton_read.decode(qg, kv, rot, None).reshape(B, H, 1, D)

    def compiled() -> torch.Tensor:
        scores = rotary_read.compiled_scores()(qg, rotary_read.pair_swap(qg), kv, rot)  # (T, B, H_kv, G)
        probs = scores.permute(1, 2, 3, 0).softmax(-1, dtype=torch.float32).to(dtype)  # (B, H_kv, G, T)
        return (probs @ kv).reshape(B, H, 1, D)

    def rotated() -> torch.Tensor:
        k = apply_rotary(kv, cis, out=workspace)  # (B, H_kv, T, D)
        return F.scaled_dot_product_attention(q, k, kv, enable_gqa=G > 1)

    def qkv() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, keys, values)

    size = kv.numel() * kv.element_size()
    paths = {"triton": triton, "compiled": compiled, "workspace": rotated, "qkv": qkv}
    return paths, {"triton": size, "compiled": size, "workspace": size, "qkv": 2 * keys.numel() * keys.element_size()}


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    """Seconds of one call (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    import time
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(B: int, H: int, G: int, D: int, T: int, dtype: torch.dtype, device: torch.device,
            repeats: int) -> dict[str, tuple[float, float]]:
    """{path: (median seconds, GB/s)}; raises if the K = V paths disagree."""
    paths, nbytes = make_paths(B, H, G, D, T, dtype, device)
    want = paths["workspace"]().float()
    for name in ("triton", "compiled"):
        got = paths[name]().float()
        err = (got - want).abs().max().item()
        if err > (2e-2 if dtype != torch.float32 else 1e-4):
            raise SystemExit(f"error: the {name} read differs from the workspace read by {err:.3g}")
    times: dict[str, list[float]] = {name: [] for name in paths}
    with torch.inference_mode():
        for _ in range(3):  # warm-up: builds, autotuning, caches
            for fn in paths.values():
                fn()
        for r in range(repeats):
            order = list(paths)[r % len(paths):] + list(paths)[:r % len(paths)]
            for name in order:
                times[name].append(timed(paths[name], device))
    return {name: (statistics.median(ts), nbytes[name] / statistics.median(ts) / 1e9) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        sys.exit(f"error: --device {args.device}: this benchmark is for CUDA GPUs, and none is available here")
    if not triton_read.available():
        sys.exit("error: triton is not installed (pip install 'qkvlab[gpu]')")
    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, {args.dtype}, batch {args.batch}, "
          f"{args.heads} heads of {args.head_dim}, median of {args.repeats} interleaved")
    print(f"{'G':>3} {'cached':>7} " + " ".join(f"{p + ' ms':>13} {'GB/s':>6}" for p in PATHS)
          + "  triton/workspace  triton/qkv")
    for T in args.context:
        for G in args.groups:
            res = measure(args.batch, args.heads, G, args.head_dim, T, dtype, device, args.repeats)
            cells = " ".join(f"{res[p][0] * 1e3:>13.3f} {res[p][1]:>6.0f}" for p in PATHS)
            print(f"{G:>3} {T:>7} {cells}  {res['workspace'][0] / res['triton'][0]:>15.2f}x "
                  f"{res['qkv'][0] / res['triton'][0]:>10.2f}x")


if __name__ == "__main__":
    main()
