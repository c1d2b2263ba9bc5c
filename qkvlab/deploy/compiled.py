"""Compiled decoding in the running process: `StaticDecoder` through `torch.compile`.

Eager decoding pays Python and dispatch overhead for every operation of every layer at every token, which
dominates small models (a 2-layer d_model 128 step is about 1 ms, mostly overhead). `StaticDecoder` (the
program `qkvlab export --format pt2` exports) reads a fixed-size cache with a mask, so its decode step has
the same shapes at every token: compiled once, every later step is one graph (Inductor's C++ on the CPU).
The prompt runs eagerly through the same module (compiling every prompt length would cost more than it
saves). Batch 1: prompts run one after another. CPU only for now, as `StaticDecoder` is (its cache tensors
are made on the CPU); on CUDA the same step under mode "reduce-overhead" would add CUDA graphs (not built:
no GPU here to test it).

    decoder = CompiledDecoder(model, max_context=512)
    tokens = decoder.generate([[1, 2, 3]], SamplingConfig(max_new_tokens=32, temperature=0))
"""

from __future__ import annotations

import torch

from qkvlab.deploy.pt2 import StaticDecoder, generate_with
from qkvlab.errors import QkvlabError, check


class CompiledDecoder:
    """A decoder's compiled one-token step over a static cache of `max_context` slots (batch 1)."""

    def __init__(self, model, max_context: int, cache_dtype: str | torch.dtype | None = None):
        device = model.tok_emb.weight.device
        check(device.type == "cpu", f"compiled decoding runs on the CPU, got a model on {device}")
        self.static = StaticDecoder(model, max_context, cache_dtype)
        self.step = torch.compile(self.static, dynamic=False, fullgraph=True)
        self.max_context, self.vocab_size = max_context, model.config.vocab_size

    def warm_up(self) -> None:
        """Compile now (tens of seconds on a CPU): a failing compiler is one clear error here, not mid-run."""
        cache = self.static.empty_cache()
        try:
            with torch.no_grad():
                self.step(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long), *cache)
        except Exception as e:  # noqa: BLE001 - any backend failure means compiled decoding is unavailable
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise QkvlabError(f"compiled decoding needs torch.compile, which failed here: {first[:200]}") from None

    def generate(self, prompts: list[list[int]], config) -> list[list[int]]:
        """The new tokens of each prompt (a `SamplingConfig`), as `qkvlab.generate.generate` returns them."""
        if config.max_new_tokens > 0:
            self.warm_up()
        return [generate_with(self.static, self.step, self.static.empty_cache(), ids, config, self.max_context,
                              self.vocab_size) for ids in prompts]
