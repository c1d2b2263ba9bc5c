"""The int8 (and float8) KV cache: exact bytes for every variant, decoding close to the float cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qkvlab.cost import STUDY_VARIANTS, cache_bytes
from qkvlab.errors import QkvlabError
from qkvlab.models import ModelConfig, build_model
from qkvlab.nn.kv_cache import SCALE_DTYPE, KVCache, dequantize, quantize, resolve_cache_dtype
from tests.core.helpers import randomize_, small

B, MAX_LEN = 2, 24
# int8 cached logits within this of the float cache's (randomized small models: logits of order 1-10).
INT8_ATOL = 0.05
VARIANTS = list(STUDY_VARIANTS) + ["GQA-4", "Q-GQA-2", "Q=X/GQA-2"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_bytes_are_values_plus_a_bf16_scale_per_token_and_head(variant, dtype):
    config = small(variant=variant, max_seq_len=MAX_LEN)
    cache = KVCache.for_model(config, B, dtype=dtype)
    L, H, D, S = config.n_layers, config.n_kv_heads, config.resolved_head_dim, config.spec.cache_streams
    assert cache.nbytes == S * L * B * H * MAX_LEN * (D * 1 + 2)
    assert cache.bytes_per_token == S * L * H * (D + 2)
    assert cache_bytes(config, None, MAX_LEN, B, dtype) == cache.nbytes
    assert [s.dtype for s in cache.scales] == [SCALE_DTYPE] * S
    assert build_model(config).make_cache(B, dtype=dtype).nbytes == cache.nbytes


def test_q_mqa_int8_is_under_two_percent_of_a_bf16_qkv_cache():
    config = small(variant="QKV", n_heads=16, d_model=1024, max_seq_len=MAX_LEN)  # head_dim 64
    base = cache_bytes(config, "QKV", 1024, 1, "bf16")
    small_ = cache_bytes(config, "Q-MQA", 1024, 1, "int8")
    assert small_ / base == pytest.approx((64 + 2) / (2 * 16 * 64 * 2))  # 1/64 plus the scales: 1.6 %


def test_quantize_round_trip_error_is_half_a_step():
    x = torch.randn(3, 4, 5, 16) * torch.logspace(-3, 2, 5)[:, None]  # (3, 4, 5, 16) across magnitudes
    values, scales = quantize(x, torch.int8)
    assert values.dtype == torch.int8 and scales.shape == (3, 4, 5) and values.abs().max() <= 127
    err = (dequantize(values, scales) - x).abs()
    assert (err <= scales.float()[..., None] / 2 + 1e-12).all()
    zero_values, _ = quantize(torch.zeros(2, 8), torch.int8)
    assert (zero_values == 0).all()


@pytest.mark.parametrize("variant", ["QKV", "Q=K-V", "Q-K=V", "Q=K=V", "Q=X", "Q-MQA", "GQA-2", "Q=K=V+"])
@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_int8_cached_decoding_is_close_to_the_float_cache(variant, positions):
    config = small(variant=variant, positions=positions, max_seq_len=MAX_LEN)
    model = randomize_(build_model(config)).eval()
    idx = torch.randint(0, config.vocab_size, (B, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs = {}
        for dtype in (None, "int8"):
            cache = model.make_cache(B, dtype=dtype)
            chunks = [model(idx[:, :8], cache)] + [model(idx[:, t:t + 1], cache) for t in range(8, 16)]
            outs[dtype] = torch.cat(chunks, dim=1)  # (B, 16, V)
    assert (outs["int8"] - outs[None]).abs().max() < INT8_ATOL
    assert not torch.equal(outs["int8"], outs[None])  # the cache really is quantised


def test_rotary_kv_cache_stores_the_shared_tensor_unrotated_once():
    config = small(variant="Q-K=V", positions="rotary", max_seq_len=MAX_LEN)
    model = randomize_(build_model(config)).eval()
    cache = model.make_cache(1, dtype="int8")
    x = torch.randint(0, config.vocab_size, (1, 5))
    with torch.no_grad():
        model(x, cache)
        block = model.backbone.blocks[0]
        _, k, _ = block.attn.project(block.norm1(model.tok_emb(x)))  # (1, H_kv, 5, D), unrotated
    assert cache.streams == 1
    stored = cache.read(0, 5)[0]  # (1, H_kv, 5, D)
    assert (stored - k).abs().max() < 0.02  # dequantised, before rotation


def _trained_tiny_model(positions: str, variant: str) -> torch.nn.Module:
    """A 1-layer model trained for 150 steps on noisy periodic sequences (deterministic, ~2 s)."""
    torch.manual_seed(0)
    config = ModelConfig(kind="decoder", variant=variant, n_layers=1, d_model=32, n_heads=4, max_seq_len=48,
                         vocab_size=16, positions=positions)
    model = build_model(config, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        period = torch.randint(2, 6, (32, 1), generator=g)
        offset = torch.randint(0, 16, (32, 1), generator=g)
        seq = (offset + torch.arange(48) % period * 3) % 16  # (32, 48)
        loss = F.cross_entropy(model(seq[:, :-1]).flatten(0, 1), seq[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# On held-out sequences fed token by token through the cache, the int8 cache's greedy (argmax) next
# token equals the float cache's at >= this rate of positions (measured: 0.99-1.0). Free-running
# generation diverges for good after the first differing token, so it is not the measure.
AGREEMENT = 0.95


@pytest.mark.parametrize("variant,positions", [("QKV", "learned"), ("Q-K=V", "rotary"), ("Q-MQA", "learned")])
def test_greedy_tokens_agree_with_the_float_cache_on_a_trained_model(variant, positions):
    model = _trained_tiny_model(positions, variant)
    g = torch.Generator().manual_seed(2)
    period, offset = torch.randint(2, 6, (16, 1), generator=g), torch.randint(0, 16, (16, 1), generator=g)
    seq = (offset + torch.arange(40) % period * 3) % 16  # (16, 40) held out (other seed)
    seq = torch.where(torch.rand(seq.shape, generator=g) < 0.1, torch.randint(0, 16, seq.shape, generator=g), seq)
    with torch.no_grad():
        argmax = {}
        for dtype in (None, "int8"):
            cache = model.make_cache(16, dtype=dtype)
            logits = torch.cat([model(seq[:, :4], cache)] + [model(seq[:, t:t + 1], cache) for t in range(4, 40)], 1)
            argmax[dtype] = logits.argmax(-1)  # (16, 40)
    assert (argmax["int8"] == argmax[None]).float().mean() >= AGREEMENT


def test_bad_cache_dtypes_are_one_line_errors():
    with pytest.raises(QkvlabError, match="unknown cache dtype 'int4'"):
        resolve_cache_dtype("int4")
    with pytest.raises(QkvlabError, match="unknown cache dtype"):
        build_model(small()).make_cache(1, dtype="uint8")
    assert resolve_cache_dtype("fp8") == torch.float8_e4m3fn and resolve_cache_dtype("bf16") == torch.bfloat16
