"""Batched generation with the KV cache: greedy, temperature, top-k, top-p, stop tokens, chunked prefill."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qkvlab.errors import QkvlabError, check
from qkvlab.models.gpt import GPT


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick each new token. temperature 0 is greedy decoding."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    stop_tokens: tuple[int, ...] = ()
    prefill_chunk: int | None = None  # prompt tokens per forward pass; None = whole prompt at once
    seed: int | None = None

    def __post_init__(self) -> None:
        check(self.max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        check(self.top_k is None or self.top_k >= 1, f"top_k must be >= 1 or unset, got {self.top_k}")
        check(self.top_p is None or 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(self.prefill_chunk is None or self.prefill_chunk >= 1,
              f"prefill_chunk must be >= 1 or unset, got {self.prefill_chunk}")
        object.__setattr__(self, "stop_tokens", tuple(self.stop_tokens))


def sample_next(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from logits (B, V): (B,)."""
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / config.temperature
    if config.top_k is not None and config.top_k < logits.shape[-1]:
        kth = logits.topk(config.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p is not None and config.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= config.top_p  # mass before a token already reaches p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.inference_mode()
def generate(model: GPT, prompts: list[list[int]], config: SamplingConfig = SamplingConfig(),
             cache_dtype: torch.dtype | None = None) -> list[list[int]]:
    """Continue each prompt (lists of token ids, any lengths); returns only the new tokens per prompt.

    Prompts are right-padded and prefilled together (in chunks if asked), then each row
    decodes from its own length; a row stops at a stop token (kept) or `max_new_tokens`.
    """
    check(len(prompts) > 0 and all(len(p) > 0 for p in prompts), "generate needs at least one non-empty prompt")
    limit = model.config.max_seq_len
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    if longest + config.max_new_tokens > limit:
        raise QkvlabError(f"prompt of {longest} tokens + {config.max_new_tokens} new tokens exceeds the "
                          f"model's max_seq_len {limit}")
    vocab = model.config.vocab_size
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise QkvlabError(f"prompt token ids must be in 0..{vocab - 1}")
    was_training = model.training
    model.eval()
    device = model.tok_emb.weight.device
    B = len(prompts)
    idx = torch.zeros(B, longest, dtype=torch.long)
    for row, p in enumerate(prompts):
        idx[row, : len(p)] = torch.tensor(p)
    idx = idx.to(device)  # (B, L) right-padded
    cache = model.make_cache(B, max_len=longest + max(config.max_new_tokens, 1), dtype=cache_dtype)
    last = torch.tensor(lengths, device=device) - 1  # (B,) index of each row's last prompt token
    chunk = config.prefill_chunk or longest
    last_hidden = torch.empty(B, model.config.d_model, device=device)
    for start in range(0, longest, chunk):
        h = model.hidden(idx[:, start:start + chunk], cache)  # (B, t, C)
        inside = (last >= start) & (last < start + h.shape[1])  # rows whose last prompt token is here
        if inside.any():
            rows = inside.nonzero().squeeze(-1)
            last_hidden[rows] = h[rows, last[rows] - start].to(last_hidden.dtype)
    cache.set_lengths(lengths)
    logits = model.lm_head(last_hidden.to(model.lm_head.weight.dtype))  # (B, V)
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    stops = torch.tensor(config.stop_tokens, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out: list[torch.Tensor] = []
    for step in range(config.max_new_tokens):
        token = sample_next(logits, config, generator)  # (B,)
        out.append(torch.where(done, -1, token))
        done |= torch.isin(token, stops)
        if step + 1 == config.max_new_tokens or bool(done.all()):
            break
        logits = model(token[:, None], cache)[:, -1]  # (B, V)
    model.train(was_training)
    tokens = torch.stack(out, dim=1).tolist() if out else [[] for _ in prompts]  # (B, n)
    return [[t for t in row if t >= 0] for row in tokens]
