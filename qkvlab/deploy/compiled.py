"""Compiled decoding in the running process: `StaticDecoder` through `torch.compile`.

Eager decoding pays Python and dispatch overhead for every operation of every layer at every token, which
dominates small models (a 2-layer d_model 128 step is about 1 ms, mostly overhead). `StaticDecoder` (the
program `qkvlab export --format pt2` exports) reads a fixed-size cache with a mask, so its decode step has
the same shapes at every token: compiled once, every later step is one graph. The prompt runs eagerly through
the same module (compiling every prompt length would cost more than it saves). Batch 1: prompts run one after
another. On the CPU the graph is Inductor's C++; on CUDA it is compiled with mode "reduce-overhead", which
records the step as a CUDA graph and replays it for every token (one launch instead of one per kernel), the cache
tensors marked as static addresses so the graph updates them in place (as Hugging Face's static cache does).
The CUDA path is written and checked on the CPU for device placement only (`tests/deploy/test_compiled.py`: the
step on the "meta" device); there is no GPU here to run it.

    decoder = CompiledDecoder(model, max_context=512)
    tokens = decoder.generate([[1, 2, 3]], SamplingConfig(max_new_tokens=32, temperature=0))
"""

from __future__ import annotations

import torch

from qkvlab.deploy.pt2 import StaticDecoder, generate_with
from qkvlab.errors import QkvlabError, check

DEVICES = ("cpu", "cuda")


def compile_options(device: torch.device) -> dict:
    """torch.compile's options for the decode step on `device`: CUDA graphs ("reduce-overhead") on CUDA."""
    return {"mode": "reduce-overhead"} if device.type == "cuda" else {}


class CompiledDecoder:
    """A decoder's compiled one-token step over a static cache of `max_context` slots (batch 1), on the model's
    device (CPU or CUDA)."""

    def __init__(self, model, max_context: int, cache_dtype: str | torch.dtype | None = None):
        device = model.tok_emb.weight.device
        check(device.type in DEVICES, f"compiled decoding runs on {' or '.join(DEVICES)}, got a model on {device}")
        self.static = StaticDecoder(model, max_context, cache_dtype)
        self.device = device
        self.step = torch.compile(self.static, dynamic=False, fullgraph=True, **compile_options(device))
        self.max_context, self.vocab_size = max_context, model.config.vocab_size
        self._cache: list[torch.Tensor] | None = None

    def empty_cache(self) -> list[torch.Tensor]:
        """The decoder's one cache, zeroed: made once on the model's device (on CUDA at static addresses, which
        the graph reads and writes in place) and reused by every prompt."""
        if self._cache is None:
            self._cache = self.static.empty_cache()
            if self.device.type == "cuda":
                for t in self._cache:
                    torch._dynamo.mark_static_address(t)
        for t in self._cache:
            t.zero_()
        return self._cache

    def before_step(self) -> None:
        """Called before each step: on CUDA, tells the graphs a new step begins (the last one's outputs are used)."""
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()

    def warm_up(self) -> None:
        """Compile now (tens of seconds on a CPU): a failing compiler is one clear error here, not mid-run."""
        cache = self.empty_cache()
        token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        try:
            with torch.no_grad():
                self.before_step()
                self.step(token, torch.zeros(1, dtype=torch.long, device=self.device), *cache)
        except Exception as e:  # noqa: BLE001 - any backend failure means compiled decoding is unavailable
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise QkvlabError(f"compiled decoding needs torch.compile, which failed here: {first[:200]}") from None

    def generate(self, prompts: list[list[int]], config) -> list[list[int]]:
        """The new tokens of each prompt (a `SamplingConfig`), as `qkvlab.generate.generate` returns them."""
        if config.max_new_tokens > 0:
            self.warm_up()
        return [generate_with(self.static, self.step, self.empty_cache(), ids, config, self.max_context,
                              self.vocab_size, before_step=self.before_step) for ids in prompts]
