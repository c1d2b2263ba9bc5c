"""Whole decode steps with the CPU kernels of another git revision against this tree's, in one process.

Builds `qkvlab/nn/csrc` as of `--base` (read with `git show`) and as in the working tree, then times the same
model's one-token steps (the cache rewound after each, the one-pass read and the native step on) with each
library in alternating rounds; the Python side is this tree's for both, so the base must share this tree's native
step ABI (`qkvlab_step_abi`, checked: a base before the whole-step call is refused with a one-line error). Prints
medians and base / tree (above 1: the tree's kernels are faster).

    python benchmarks/kernel_ab.py --base HEAD~1 --threads 2
    python benchmarks/kernel_ab.py --base 004f775~1 --cells QKV:learned:4:512 Q-MQA:rotary:4:8192 --rounds 31
    python benchmarks/kernel_ab.py --base HEAD --cache-dtype bf16 --cells Q-MQA:rotary:4:8192

With `--cache-dtype bf16 / int8 / fp8` the caches are stored so; the native step takes float32 caches only, so
those steps run the model's per-layer path, whose cache reads still call the kernels compared.

A cell is variant:positions:batch:context; positions learned, rotary, or llama (rotary, RMSNorm, SwiGLU 1024).
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import torch
from qkv_vs_tied import decode_step_fn  # benchmarks/, on the path when this script runs

from qkvlab.arch import ModelConfig
from qkvlab.bench.peers import interleaved
from qkvlab.errors import QkvlabError
from qkvlab.models.gpt import GPT
from qkvlab.nn import kv_decode

CELLS = ["QKV:learned:1:512", "QKV:learned:4:512", "Q-K=V:llama:4:512", "QKV:rotary:4:8192", "Q-MQA:rotary:4:8192"]
SHAPE = dict(n_layers=6, d_model=384, n_heads=6, vocab_size=8192)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="HEAD", help="git revision of the kernels to compare against")
    p.add_argument("--cells", nargs="+", default=CELLS)
    p.add_argument("--rounds", type=int, default=21, help="interleaved rounds (each times both libraries once)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache-dtype", default="fp32", choices=["fp32", "bf16", "int8", "fp8"])
    return p.parse_args()


def parse_cell(cell: str) -> tuple[str, str, int, int]:
    """variant:positions:batch:context, checked (a one-line error naming the bad cell)."""
    parts = cell.split(":")
    ok = (len(parts) == 4 and parts[1] in ("learned", "rotary", "llama") and all(p.isdigit() and int(p) > 0
                                                                                  for p in parts[2:]))
    if not ok:
        raise SystemExit(f"kernel_ab.py: cell {cell!r} is not variant:positions:batch:context with positions "
                         "learned, rotary or llama and positive batch and context (e.g. Q-K=V:rotary:4:8192)")
    return parts[0], parts[1], int(parts[2]), int(parts[3])


def build_base(rev: str, out: Path):
    """The kernel library built from the sources (and headers, where the revision has them) at `rev`."""
    src = out / "csrc"
    src.mkdir()
    sources = []
    for path in (*kv_decode.SOURCES, *kv_decode.HEADERS):
        rel = path.relative_to(Path(kv_decode.__file__).parents[2]).as_posix()
        shown = subprocess.run(["git", "show", f"{rev}:{rel}"], capture_output=True, text=True)
        if shown.returncode != 0:
            if path in kv_decode.HEADERS:
                continue  # older revisions have no shared header
            raise SystemExit(f"kernel_ab.py: {rel} not found at {rev!r}: {shown.stderr.strip()}")
        (src / path.name).write_text(shown.stdout)
        if path in kv_decode.SOURCES:
            sources.append(src / path.name)
    lib = out / "base.so"
    failed = kv_decode.compile_library(kv_decode._compiler(), sources, lib)
    if failed:
        raise SystemExit(f"kernel_ab.py: building {rev!r} failed: {failed[:300]}")
    built = kv_decode.load(lib, require_all=False)
    tree, base = kv_decode.library().qkvlab_step_abi(), getattr(built, "qkvlab_step_abi", lambda: 1)()
    if base != tree:
        raise SystemExit(f"kernel_ab.py: the native step at {rev!r} has ABI {base}, this tree's {tree}: the "
                         "tree's Python would pass it the wrong arguments; compare against a later revision")
    return built


def model_for(variant: str, positions: str, context: int) -> GPT:
    llama = dict(norm="rmsnorm", mlp="swiglu", d_mlp=1024) if positions == "llama" else {}
    cfg = ModelConfig(variant=variant, positions="rotary" if positions == "llama" else positions,
                      max_seq_len=context + 1, **SHAPE, **llama)
    return GPT(cfg, seed=0).eval()


def with_library(lib, step):
    """`step` with `lib` as the kernel library that decode_step and linear call."""
    def run() -> None:
        kv_decode.library = lambda: lib
        step()
    return run


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cells = [parse_cell(cell) for cell in args.cells]
    models = {}
    for variant, positions, _, context in cells:
        try:
            models[variant, positions, context] = model_for(variant, positions, context)
        except QkvlabError as err:
            raise SystemExit(f"kernel_ab.py: {err}") from None
    tree = kv_decode.library()
    with tempfile.TemporaryDirectory() as tmp:
        base = build_base(args.base, Path(tmp))
        libraries = {"base": base, "tree": tree}
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; base = kernels at {args.base}, tree = "
              f"the working tree's; 6 layers, d_model 384, 6 heads, {args.cache_dtype} caches; medians of "
              f"{args.rounds} interleaved rounds")
        print(f"{'variant':8} {'positions':9} {'batch':>5} {'context':>7} {'base ms':>8} {'tree ms':>8} "
              f"{'base/tree':>9}")
        for variant, positions, batch, context in cells:
            model = models[variant, positions, context]
            step, _ = decode_step_fn(model, batch, context, SHAPE["vocab_size"], fused=True,
                                     dtype=None if args.cache_dtype == "fp32" else args.cache_dtype)
            fns = {name: with_library(lib, step) for name, lib in libraries.items()}
            for fn in fns.values():
                fn()  # warm-up
            t = interleaved(fns, args.rounds, torch.device("cpu"))
            print(f"{variant:8} {positions:9} {batch:5d} {context:7d} {t['base'] * 1e3:8.2f} "
                  f"{t['tree'] * 1e3:8.2f} {t['base'] / t['tree']:8.2f}x", flush=True)


if __name__ == "__main__":
    main()
