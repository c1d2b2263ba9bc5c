"""Batched generation with the KV cache: greedy, temperature, top-k, top-p, stop tokens, chunked prefill."""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from qkvlab.errors import QkvlabError, check
from qkvlab.models.gpt import GPT
from qkvlab.nn.kv_cache import QUANT_MAX, resolve_cache_dtype
from qkvlab.nn.rotary_read import check_available, unavailable

STOP_CHECK_EVERY = 16  # decode steps between looks at the device for finished rows (not on the CPU)


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
    vocab_limit: int | None = None  # sample only ids below this (a tokenizer smaller than the padded vocabulary)

    def __post_init__(self) -> None:
        check(_is_int(self.max_new_tokens) and self.max_new_tokens >= 0,
              f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        check(isinstance(self.temperature, (int, float)) and 0 <= self.temperature < math.inf,
              f"temperature must be a finite number >= 0, got {self.temperature!r}")
        check(self.top_k is None or (_is_int(self.top_k) and self.top_k >= 1),
              f"top_k must be an integer >= 1 or unset, got {self.top_k!r}")
        check(self.top_p is None or (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1),
              f"top_p must be in (0, 1], got {self.top_p!r}")
        check(self.prefill_chunk is None or (_is_int(self.prefill_chunk) and self.prefill_chunk >= 1),
              f"prefill_chunk must be an integer >= 1 or unset, got {self.prefill_chunk!r}")
        check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2 ** 63),
              f"seed must be an integer in [0, 2^63) or unset, got {self.seed!r}")
        check(self.vocab_limit is None or (_is_int(self.vocab_limit) and self.vocab_limit >= 1),
              f"vocab_limit must be an integer >= 1 or unset, got {self.vocab_limit!r}")
        check(not isinstance(self.stop_tokens, (str, bytes)),
              f"stop_tokens must be token ids, got {self.stop_tokens!r}")
        stops = tuple(self.stop_tokens) if isinstance(self.stop_tokens, Iterable) else (self.stop_tokens,)
        for t in stops:
            check(_is_int(t) and t >= 0, f"stop token {t!r} is not a token id (an integer >= 0)")
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in stops))


def _is_int(value) -> bool:
    """An integer (Python, NumPy or 0-d integer tensor), not a bool or a float."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype.is_floating_point):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def check_token_ids(prompts, vocab: int) -> list[list[int]]:
    """`prompts` as lists of ints in [0, vocab): a one-line error naming the first bad value otherwise."""
    if isinstance(prompts, torch.Tensor):
        check(prompts.dim() == 2, f"prompts as a tensor must be 2-D (batch, length), got shape {tuple(prompts.shape)}")
        prompts = prompts.tolist()
    check(isinstance(prompts, (list, tuple)) and len(prompts) > 0,
          f"prompts must be a non-empty list of token-id lists, got {type(prompts).__name__}")
    rows = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            check(p.dim() == 1, f"prompt {i} must be 1-D, got shape {tuple(p.shape)}")
            p = p.tolist()
        check(isinstance(p, (list, tuple)), f"prompt {i} must be a list of token ids, got {p!r}"[:200])
        check(len(p) > 0, f"prompt {i} is empty; generate needs at least one token per prompt")
        for t in p:
            check(_is_int(t), f"prompt {i} holds {t!r}, which is not an integer token id")
            check(0 <= t < vocab, f"prompt {i} holds token id {int(t)}, outside the vocabulary 0..{vocab - 1}")
        rows.append([int(t) for t in p])
    return rows


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
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # on the logits' device


@torch.inference_mode()
def generate(model: GPT, prompts: list[list[int]], config: SamplingConfig = SamplingConfig(),
             cache_dtype: str | torch.dtype | None = None, fused_rotary: bool | None = None) -> list[list[int]]:
    """Continue each prompt (lists of token ids, any lengths); returns only the new tokens per prompt.

    `cache_dtype` (default: the model's) may be "int8" or "fp8" for a quantised cache. `fused_rotary`:
    a K = V model with rotary positions rotates its keys as it reads them (`qkvlab.nn.rotary_read`: a C++
    kernel for float32 on the CPU, a Triton kernel on CUDA where triton is installed (`qkvlab.nn.triton_read`),
    torch.compile elsewhere; built on first use), instead of into a workspace
    as large as the cache; with learned positions, K = V models with grouped heads (Q-GQA, Q-MQA) read each
    cached key once for all its query heads through the same kernel, and an int8 / fp8 cache (any variant) is
    dequantised while it is read instead of into a float copy of every layer's cache at every step; the
    unrotated keys of a large float cache (any variant: from 2 MiB a layer, grouped from 512 KiB) are read once
    too. None (the default): on the CPU where the kernel builds, and for quantised caches wherever the read can
    run (Triton or torch.compile off the CPU); else off (int8 then dequantises per step, 5-10x slower).

    Prompts are right-padded and prefilled together (in chunks if asked), then each row
    decodes from its own length; a row stops at a stop token (kept) or `max_new_tokens`.
    The decoding loop never waits on the device: tokens are sampled where the model is and read
    back once at the end. Only stop tokens need a look at the device, every step on the CPU (where
    it is free) and every `STOP_CHECK_EVERY` steps on an accelerator.
    """
    vocab = model.config.vocab_size
    prompts = check_token_ids(prompts, vocab)
    for t in config.stop_tokens:
        check(t < vocab, f"stop token {t} is outside the vocabulary 0..{vocab - 1}")
    allowed = min(config.vocab_limit or vocab, vocab)
    limit = model.config.max_seq_len
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    if longest + config.max_new_tokens > limit:
        raise QkvlabError(f"prompt of {longest} tokens + {config.max_new_tokens} new tokens exceeds the "
                          f"model's max_seq_len {limit}")
    was_training = model.training
    model.eval()
    device = model.tok_emb.weight.device
    B = len(prompts)
    idx = torch.zeros(B, longest, dtype=torch.long)
    for row, p in enumerate(prompts):
        idx[row, : len(p)] = torch.tensor(p)
    idx = idx.to(device)  # (B, L) right-padded
    quantized = resolve_cache_dtype(cache_dtype) in QUANT_MAX
    if fused_rotary is None:  # small unrotated float caches keep SDPA inside it
        fused_rotary = (torch.device(device).type == "cpu" or quantized) and unavailable(
            device, model.tok_emb.weight.dtype) is None
    elif fused_rotary:  # any model's cache may take the read: one clear line now, not an error mid-generation
        check_available(device, model.tok_emb.weight.dtype)
    cache = model.make_cache(B, max_len=longest + max(config.max_new_tokens, 1), dtype=cache_dtype,
                             fused_rotary=fused_rotary)
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
    generator = torch.Generator(device).manual_seed(config.seed) if config.seed is not None else None
    stops = torch.tensor(config.stop_tokens, dtype=torch.long, device=device)
    check_every = 1 if device.type == "cpu" else STOP_CHECK_EVERY
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out: list[torch.Tensor] = []
    for step in range(config.max_new_tokens):
        if allowed < vocab:  # ids the tokenizer cannot decode (vocabulary padding) are never sampled
            logits[:, allowed:] = float("-inf")
        token = sample_next(logits, config, generator)  # (B,)
        out.append(torch.where(done, -1, token) if config.stop_tokens else token)  # finished rows emit -1
        done |= torch.isin(token, stops)
        if step + 1 == config.max_new_tokens:
            break
        if config.stop_tokens and (step + 1) % check_every == 0 and bool(done.all()):  # the only host read
            break
        logits = model(token[:, None], cache)[:, -1]  # (B, V)
    model.train(was_training)
    tokens = torch.stack(out, dim=1).tolist() if out else [[] for _ in prompts]  # (B, n)
    return [[t for t in row if t >= 0] for row in tokens]
