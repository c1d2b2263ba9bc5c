"""Deployment numbers per variant and cache dtype: export file size, cache per 1k tokens, tokens/s, peak memory,
and the int8 cache's perplexity change.

    python benchmarks/deploy.py --runs /tmp/dep/lm-QKV /tmp/dep/lm-Q-K=V /tmp/dep/lm-Q-MQA --out /tmp/dep/bench

For each run and cache dtype (fp32, int8): `export_pt2` writes an AOTInductor package, then a fresh
process loads it (torch only), generates `--new` tokens greedily after a `--prompt`-token prompt, and
reports tokens/s and its peak resident memory (ru_maxrss, so the Python + torch baseline is included;
the baseline measured just after `import torch` is printed too). The perplexity is the task's own
held-out evaluation with every attention reading its keys and values back from a (quantised) cache.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(package: str, prompt: int, new: int, repeats: int) -> dict:
    """In this process: load the package, generate, report tokens/s and peak RSS."""
    import torch

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from qkvlab.deploy.pt2 import Pt2Runner, generate_with
    from qkvlab.generate import SamplingConfig

    runner = Pt2Runner(package)
    gen = torch.Generator().manual_seed(0)
    tokens = [int(t) for t in torch.randint(0, runner.vocab_size, (prompt,), generator=gen)]
    sampling = SamplingConfig(max_new_tokens=new, temperature=0)
    generate_with(runner.prefill, runner.decode, runner.empty_cache(), tokens, sampling, runner.max_context,
                  runner.vocab_size)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = generate_with(runner.prefill, runner.decode, runner.empty_cache(), tokens, sampling,
                            runner.max_context, runner.vocab_size)
        best = min(best, time.perf_counter() - start)
    return {"tokens_per_s": len(out) / best, "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "torch_rss_kib": base_rss, "cache_bytes": runner.cache_nbytes, "threads": torch.get_num_threads()}


def perplexity(run: str, cache_dtype: str | None) -> float:
    import torch
    from torch import nn

    from qkvlab.models.io import load_model
    from qkvlab.tasks.registry import get_task

    model = load_model(run)

    class ThroughCache(nn.Module):  # every forward writes K, V to a fresh cache and attends from it
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.model(idx, self.model.make_cache(idx.shape[0], idx.shape[1], cache_dtype))

    task = get_task("shakespeare-char")
    task.setup(model.config, "quick")
    with torch.no_grad():
        return task.evaluate(ThroughCache(), batch_size=64)["perplexity"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--out", required=True, help="directory for the .pt2 files (new or empty)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out, replacing its files")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.prompt, args.new, args.repeats)))
        return
    from qkvlab.atomic import check_output
    from qkvlab.cost import cache_bytes_per_token
    from qkvlab.deploy.pt2 import export_pt2
    from qkvlab.errors import QkvlabError
    from qkvlab.models.io import load_model

    try:  # its .pt2 files and deploy.json are replaced: only in a new or empty directory unless --force
        out = check_output(args.out, args.force, sources=args.runs)
    except QkvlabError as e:
        raise SystemExit(f"deploy.py: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for run in args.runs:
        config = load_model(run).config
        ppl = {"fp32": perplexity(run, None), "int8": perplexity(run, "int8")}
        for dtype in args.dtypes:
            package = out / f"{config.variant.replace('=', '_')}-{dtype}.pt2"
            info = export_pt2(run, package, config.max_seq_len, dtype, force=True)
            child = subprocess.run([sys.executable, __file__, "--runs", run, "--out", args.out,
                                    "--measure", str(package), "--prompt", str(args.prompt), "--new", str(args.new),
                                    "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
            m = json.loads(child.stdout.strip().splitlines()[-1])
            row = {"variant": config.variant, "cache": dtype, "file_bytes": info["bytes"],
                   "export_s": round(info["seconds"], 1), "cache_bytes": m["cache_bytes"],
                   "cache_per_1k_tokens": 1024 * cache_bytes_per_token(config, None, dtype),
                   "tokens_per_s": round(m["tokens_per_s"], 1), "peak_rss_mib": round(m["peak_rss_kib"] / 1024, 1),
                   "torch_rss_mib": round(m["torch_rss_kib"] / 1024, 1), "perplexity": round(ppl[dtype], 4),
                   "perplexity_change": f"{100 * (ppl[dtype] / ppl['fp32'] - 1):+.3f} %"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    (out / "deploy.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
