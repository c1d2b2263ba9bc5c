"""The KV cache stores only distinct tensors of grouped heads: exact byte counts and contents."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from qkvlab.errors import QkvlabError
from qkvlab.nn.kv_cache import KVCache
from qkvlab.nn.positions import apply_rotary
from qkvlab.variants import parse_variant

from .helpers import make, small

B, MAX_LEN = 3, 24


def _cache(variant: str, dtype=torch.float32, n_heads: int = 16, **kw) -> KVCache:
    config = small(variant=variant, n_heads=n_heads, d_model=64, max_seq_len=MAX_LEN, **kw)
    return KVCache.for_model(config, B, dtype=dtype)


def test_qkv_cache_holds_two_full_streams():
    config = small(variant="QKV", max_seq_len=MAX_LEN)
    L, H, D = config.n_layers, config.n_heads, config.resolved_head_dim
    cache = KVCache.for_model(config, B)
    assert cache.nbytes == 2 * L * B * H * MAX_LEN * D * 4
    assert cache.bytes_per_token == 2 * L * H * D * 4
    model_cache = make(config).make_cache(B)
    assert model_cache.nbytes == cache.nbytes


# Fractions of QKV's cache with 16 query heads (PAPER.md), and the untabled forms.
FRACTIONS = {
    "QKV": Fraction(1), "Q=K-V": Fraction(1), "Q=X": Fraction(1),
    "Q-K=V": Fraction(1, 2), "Q=K=V": Fraction(1, 2), "Q=X-K=V": Fraction(1, 2), "Q=K=V+": Fraction(1, 2),
    "GQA-4": Fraction(1, 4), "MQA": Fraction(1, 16), "Q-GQA-4": Fraction(1, 8), "Q-MQA": Fraction(1, 32),
    "GQA-8": Fraction(1, 2), "Q-GQA-8": Fraction(1, 4), "Q=X/GQA-2": Fraction(1, 8), "Q=X-K=V/MQA": Fraction(1, 32),
}


@pytest.mark.parametrize("variant", list(FRACTIONS))
def test_cache_bytes_shrink_exactly_as_the_paper_says(variant):
    base, cache = _cache("QKV"), _cache(variant)
    assert Fraction(cache.nbytes, base.nbytes) == FRACTIONS[variant]
    assert Fraction(cache.bytes_per_token, base.bytes_per_token) == FRACTIONS[variant]
    assert parse_variant(variant).cache_fraction(16) == float(FRACTIONS[variant])


@pytest.mark.parametrize("variant", ["QKV", "Q-K=V", "Q-GQA-4", "Q-MQA", "Q=X/GQA-2"])
def test_buffers_hold_grouped_heads_only(variant):
    config = small(variant=variant, n_heads=16, d_model=64, max_seq_len=MAX_LEN)
    cache = make(config).make_cache(B)
    streams = {"QKV": 2, "Q-K=V": 1, "Q-GQA-4": 1, "Q-MQA": 1, "Q=X/GQA-2": 2}[variant]
    assert cache.streams == len(cache.buffers) == streams
    shape = (config.n_layers, B, config.n_kv_heads, MAX_LEN, config.resolved_head_dim)
    for buffer in cache.buffers:
        assert buffer.shape == shape
    assert cache.nbytes == streams * math.prod(shape) * 4  # float32, counted from the shape


@pytest.mark.parametrize("variant", ["QKV", "Q-K=V", "Q-MQA"])
def test_bf16_halves_the_cache(variant):
    assert _cache(variant, torch.bfloat16).nbytes * 2 == _cache(variant, torch.float32).nbytes
    config = small(variant=variant, max_seq_len=MAX_LEN)
    model = make(config)
    assert model.make_cache(B, dtype=torch.bfloat16).nbytes * 2 == model.make_cache(B).nbytes
    model = model.to(torch.bfloat16)
    cache = model.make_cache(B)
    assert all(b.dtype == torch.bfloat16 for b in cache.buffers)


def test_shorter_cache_scales_linearly():
    config = small(variant="Q-GQA-2", max_seq_len=MAX_LEN)
    full, short = KVCache.for_model(config, B), KVCache.for_model(config, B, max_len=6)
    assert short.nbytes * 4 == full.nbytes
    assert short.bytes_per_token == full.bytes_per_token


@pytest.mark.parametrize("max_len", [0, -1, MAX_LEN + 1])
def test_cache_length_outside_the_model_raises(max_len):
    with pytest.raises(QkvlabError):
        KVCache.for_model(small(max_seq_len=MAX_LEN), B, max_len=max_len)


@pytest.mark.parametrize("streams", [0, 3])
def test_cache_streams_must_be_one_or_two(streams):
    with pytest.raises(QkvlabError):
        KVCache(2, 1, 2, 8, 16, streams)


def test_positions_and_overflow():
    cache = _cache("QKV")
    assert cache.positions(4, "cpu").tolist() == [[0, 1, 2, 3]] * B
    cache.set_lengths([2, 0, 5])
    assert cache.positions(2, "cpu").tolist() == [[2, 3], [0, 1], [5, 6]]
    assert cache.key_length(2) == 7
    with pytest.raises(QkvlabError):
        cache.positions(MAX_LEN - 4, "cpu")
    cache.reset()
    assert cache.lengths.tolist() == [0] * B


# --- what is stored -------------------------------------------------------------------------
def _run_capturing_inputs(model, idx, chunks):
    """Decode `idx` through a fresh cache in `chunks`; return the cache and each layer's attention input."""
    inputs = {i: [] for i in range(model.config.n_layers)}
    hooks = [block.attn.register_forward_pre_hook(lambda m, args, i=i: inputs[i].append(args[0]))
             for i, block in enumerate(model.backbone.blocks)]
    cache = model.make_cache(idx.shape[0])
    start = 0
    try:
        with torch.no_grad():
            for n in chunks:
                model(idx[:, start:start + n], cache=cache)
                start += n
    finally:
        for h in hooks:
            h.remove()
    return cache, {i: torch.cat(xs, dim=1) for i, xs in inputs.items()}


@pytest.mark.parametrize("variant", ["Q-K=V", "Q=K=V", "Q-MQA", "Q=X-K=V/GQA-2"])
def test_tied_kv_cache_with_rotary_stores_the_unrotated_tensor(variant):
    model = make(small(variant=variant, positions="rotary"))
    T = 9
    idx = torch.randint(0, 50, (2, T), generator=torch.Generator().manual_seed(8))
    cache, inputs = _run_capturing_inputs(model, idx, [4, 2, 1, 1, 1])
    assert cache.streams == 1
    rotary = model.backbone.rotary
    for layer, block in enumerate(model.backbone.blocks):
        with torch.no_grad():
            _, k, v = block.attn.project(inputs[layer])  # (B, H_kv, T, D), before rotation
        assert v is None
        assert k.shape[1] == model.config.n_kv_heads
        stored = cache.buffers[0][layer, :, :, :T]
        torch.testing.assert_close(stored, k, atol=1e-5, rtol=1e-6)
        rotated = apply_rotary(k, rotary.tables(torch.arange(T)))
        assert (stored - rotated).abs().max() > 1e-2  # the check can tell the two apart


@pytest.mark.parametrize("variant", ["QKV", "GQA-2", "Q=X/MQA"])
def test_separate_kv_cache_with_rotary_stores_rotated_keys_and_plain_values(variant):
    model = make(small(variant=variant, positions="rotary"))
    T = 9
    idx = torch.randint(0, 50, (2, T), generator=torch.Generator().manual_seed(8))
    cache, inputs = _run_capturing_inputs(model, idx, [4, 2, 1, 1, 1])
    assert cache.streams == 2
    rotary = model.backbone.rotary
    for layer, block in enumerate(model.backbone.blocks):
        with torch.no_grad():
            _, k, v = block.attn.project(inputs[layer])
        assert k.shape[1] == v.shape[1] == model.config.n_kv_heads
        rotated = apply_rotary(k, rotary.tables(torch.arange(T)))
        torch.testing.assert_close(cache.buffers[0][layer, :, :, :T], rotated, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(cache.buffers[1][layer, :, :, :T], v, atol=1e-5, rtol=1e-6)


def test_reset_cache_gives_the_same_logits_again():
    model = make(small(variant="Q-GQA-2", positions="rotary"))
    idx = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        cache = model.make_cache(2)
        first = torch.cat([model(idx[:, :5], cache=cache), model(idx[:, 5:], cache=cache)], dim=1)
        cache.reset()
        second = torch.cat([model(idx[:, :3], cache=cache), model(idx[:, 3:], cache=cache)], dim=1)
    torch.testing.assert_close(first, second, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["QKV", "Q-K=V"])
def test_bf16_cache_decodes_a_float32_model(variant):
    # make_cache(dtype=...) offers a smaller cache than the model's dtype; decoding must still work,
    # agreeing with the float32 forward up to bf16 rounding of the stored keys/values.
    model = make(small(variant=variant, positions="rotary"))
    idx = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        full = model(idx)
        cache = model.make_cache(2, dtype=torch.bfloat16)
        decoded = torch.cat([model(idx[:, :5], cache=cache)] + [model(idx[:, i:i + 1], cache=cache)
                                                                for i in range(5, 8)], dim=1)
    assert decoded.dtype == torch.float32
    assert (decoded - full).abs().max() < 0.05 * full.abs().max()
