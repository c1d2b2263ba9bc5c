"""One decode step at batch 1: our eager step, our compiled step (`qkvlab generate --compile`) and Hugging Face's.

The compiled step is `qkvlab.deploy.compiled.CompiledDecoder`: `StaticDecoder` (a cache of `context + 1` slots
read with a mask) through torch.compile, so a step is one graph instead of a few hundred eager operations. Small
models are where that matters: their steps are mostly per-operation overhead. Same weights for all three
(the HF peer holds our QKV / GQA-2 weights, as in `qkvlab bench`), one process, interleaved, medians.

    python benchmarks/compiled_decode.py --threads 2                     # 2 layers, d_model 128, gpt2 + llama
    python benchmarks/compiled_decode.py --layers 6 --d-model 384 --heads 6 --contexts 512 2048
"""

from __future__ import annotations

import argparse

import torch

from qkvlab.bench.peers import BenchSettings, build_contenders, interleaved, peer_status
from qkvlab.deploy.compiled import CompiledDecoder


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["gpt2", "llama"])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-mlp", type=int, default=344)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = BenchSettings(shapes=tuple(args.shapes), peers=("hf",), layers=args.layers, d_model=args.d_model,
                             heads=args.heads, d_mlp=args.d_mlp, vocab=args.vocab, contexts=tuple(args.contexts),
                             batches=(1,))
    ok, why = peer_status("hf")
    if not ok:
        raise SystemExit(f"compiled_decode.py: the Hugging Face peer is unavailable: {why} (pip install qkvlab[bench])")
    available = {"hf": True}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch 1, one new token on `context` cached "
          f"tokens; median of {args.repeats} interleaved steps; speed-up = HF step / this step")
    for shape in args.shapes:
        contenders = build_contenders(settings, shape, available)
        ours, hf = contenders[0], contenders[-1]
        for c in contenders:
            c.model.eval()
        print(f"\n{shape}: {args.layers} layers, d_model {args.d_model}, {args.heads} heads ({ours.name} vs {hf.name})")
        print(f"{'context':>7}  {'path':<22} {'ms':>7} {'vs HF':>7}")
        gen = torch.Generator().manual_seed(0)
        token = torch.randint(0, args.vocab, (1, 1), generator=gen)
        for context in args.contexts:
            with torch.inference_mode():
                eager_cache, hf_cache = ours.fill(1, context, gen), hf.fill(1, context, gen)
            compiled = CompiledDecoder(ours.model, context + 1)
            static = compiled.static.empty_cache()
            prompt = torch.randint(0, args.vocab, (1, context), generator=gen)
            start, at = torch.zeros(1, dtype=torch.long), torch.tensor([context])
            with torch.no_grad():
                compiled.static(prompt, start, *static)  # the prompt, eager, into the static cache
                compiled.step(token, at, *static)  # compile

            def compiled_step(compiled=compiled, static=static, at=at, token=token):
                with torch.no_grad():
                    compiled.step(token, at, *static)  # writes slot `context` again every time

            def eager_step(cache=eager_cache, context=context, ours=ours, token=token):
                with torch.inference_mode():
                    ours.step(cache, token, context)

            def hf_step(cache=hf_cache, context=context, hf=hf, token=token):
                with torch.inference_mode():
                    hf.step(cache, token, context)

            medians = interleaved({"eager": eager_step, "compiled": compiled_step, "hf": hf_step}, args.repeats,
                                  torch.device("cpu"))
            for path, name in (("eager", f"{ours.name} eager"), ("compiled", f"{ours.name} compiled"),
                               ("hf", hf.name)):
                ratio = medians["hf"] / medians[path]
                print(f"{context:>7}  {name:<22} {medians[path] * 1e3:>7.2f} {ratio:>6.2f}x")


if __name__ == "__main__":
    main()
