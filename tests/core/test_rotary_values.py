"""Rotary values (`ModelConfig.rotary_values`): values turn by their positions, outputs back by the query's.

Attention then equals out_m = sum_n p_mn R(n - m) v_n (checked against that formula written out), which depends on
relative positions only; keys and values are stored rotated, so K = V decodes with no rotation at read time. Cached
decoding (per-layer, fused read, native step) equals the full forward; tied equals untied with copied weights; the
exporters carry it or refuse it in one line.
"""

from __future__ import annotations

import pytest
import torch

from qkvlab.errors import QkvlabError
from qkvlab.hf.export import to_llama
from qkvlab.models import ModelConfig
from qkvlab.models.io import load_model, save_model
from qkvlab.nn import decode_step, rotary_read
from qkvlab.nn.attention import Attention, AttentionContext
from qkvlab.nn.positions import Rotary, apply_rotary

from .helpers import ATOL, make, small
from .test_tying_equivalence import _untie

VARIANTS = ("QKV", "Q-K=V", "Q-MQA", "Q=K=V", "Q-GQA-2", "Q=X-K=V")


def config(variant: str = "Q-K=V", **kw) -> ModelConfig:
    return small(**({"variant": variant, "positions": "rotary", "rotary_values": True} | kw))


@pytest.mark.parametrize("kw, message", [
    (dict(positions="learned"), "rotary_values=True needs positions='rotary' \\(got 'learned'\\)"),
    (dict(positions="none"), "rotary_values=True needs positions='rotary'"),
    (dict(rotary_values="yes"), "rotary_values must be true or false, got 'yes'"),
    (dict(rotary_values=1), "rotary_values must be true or false, got 1"),
])
def test_bad_settings_are_one_line_errors(kw, message):
    with pytest.raises(QkvlabError, match=message) as err:
        small(**({"positions": "rotary", "rotary_values": True} | kw))
    assert "\n" not in str(err.value)


def _by_formula(attn: Attention, x: torch.Tensor, start: int) -> torch.Tensor:
    """sum_n p_mn R(n - m) v_n per head, causal, written out with a rotation per (m, n) pair: (B, H, T, D)."""
    q, k, v = attn.project(x)
    v = k if v is None else v
    rep = attn.n_heads // attn.n_kv_heads
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # (B, H, T, D)
    rotary = attn.rotary
    T = x.shape[1]
    pos = torch.arange(start, start + T)
    q, k = rotary(q, pos), rotary(k, pos)
    scores = (q @ k.transpose(-2, -1)) * attn.head_dim ** -0.5  # (B, H, T, T)
    probs = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    offsets = rotary.tables((pos[None, :] - pos[:, None]).reshape(-1)).view(T, T, -1)  # (T, T, R/2): n - m
    B, H, _, D = v.shape
    turned = apply_rotary(v[:, :, None].expand(B, H, T, T, D), offsets)  # (B, H, T_m, T_n, D)
    return (probs[..., None] * turned).sum(-2)  # (B, H, T, D)


@pytest.mark.parametrize("variant", ["QKV", "Q-K=V", "Q-MQA", "Q=K=V"])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_attention_is_the_relative_formula_at_any_start(variant, fraction):
    torch.manual_seed(0)
    model = make(config(variant, rotary_fraction=fraction))
    attn = model.backbone.blocks[0].attn
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        heads = {}
        for start in (0, 37):
            ctx = AttentionContext(q_pos=torch.arange(start, start + 9).expand(2, 9), k_len=9, is_causal=True)
            out = attn(x, ctx)
            heads[start] = out
            expected = attn._merge(_by_formula(attn, x, start))
            torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(heads[0], heads[37], atol=ATOL, rtol=0)  # relative positions only


def test_values_do_turn():
    """The same weights without rotary values give other outputs (the option is not a no-op)."""
    on = make(config())
    off = make(config(rotary_values=False))
    off.load_state_dict(on.state_dict())
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        assert (on(x) - off(x)).abs().max() > 1e-2


def _decode(model, x, prefill: int, **cache_kw):
    with torch.no_grad():
        cache = model.make_cache(x.shape[0], x.shape[1], **cache_kw)
        out = [model(x[:, :prefill], cache)] + [model(x[:, i:i + 1], cache) for i in range(prefill, x.shape[1])]
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_cached_decoding_equals_the_full_forward(variant, fraction, monkeypatch):
    """The per-layer path (SDPA over the cache), the fused read and the native step: each equals the full
    forward; the native step writes the cache the per-layer path writes (keys stored rotated)."""
    model = make(config(variant, rotary_fraction=fraction))
    x = torch.randint(0, 50, (3, 14))
    with torch.no_grad():
        full = model(x)
    plain, _ = _decode(model, x, 5)
    torch.testing.assert_close(plain, full, atol=ATOL, rtol=0)
    monkeypatch.setattr(decode_step, "enabled", False)
    fused, layered_cache = _decode(model, x, 5, fused_rotary=True)
    torch.testing.assert_close(fused, full, atol=ATOL, rtol=0)
    monkeypatch.setattr(decode_step, "enabled", True)
    native, native_cache = _decode(model, x, 5, fused_rotary=True)
    torch.testing.assert_close(native, full, atol=ATOL, rtol=0)
    for mine, theirs in zip(native_cache.buffers, layered_cache.buffers, strict=True):
        torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["QKV", "Q-K=V", "Q-MQA"])
@pytest.mark.parametrize("dtype", ["int8", "bf16"])
def test_narrow_caches_read_in_place_equal_their_dequantised_read(variant, dtype, monkeypatch):
    """int8 / bfloat16 caches: the one-pass read of the stored values (no rotation table for K = V) gives what
    SDPA over the dequantised cache gives. One layer, so both write the same cache (with two, a difference at
    float32 rounding in the first layer's output can round a second-layer value to the next int8 step)."""
    monkeypatch.setattr(decode_step, "enabled", False)
    model = make(config(variant, n_layers=1))
    x = torch.randint(0, 50, (2, 12))
    fused, _ = _decode(model, x, 4, dtype=dtype, fused_rotary=True)
    plain, _ = _decode(model, x, 4, dtype=dtype)
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=0)


def test_the_native_step_serves_it(monkeypatch):
    from tests.core.test_decode_step import counting_native_calls

    model = make(config("Q-MQA"))
    x = torch.randint(0, 50, (2, 10))
    with counting_native_calls() as served:
        _decode(model, x, 4, fused_rotary=True)
    assert served == ["decode_tokens"] * 6


def test_k_equals_v_reads_its_cache_without_a_rotation_table(monkeypatch):
    """The fused read of a K = V cache is asked for no rotation table (the keys are stored rotated)."""
    monkeypatch.setattr(decode_step, "enabled", False)
    seen = []
    real = rotary_read.decode_attention

    def spy(q, k, rot, *args, **kw):
        seen.append(rot)
        return real(q, k, rot, *args, **kw)

    monkeypatch.setattr("qkvlab.nn.attention.decode_attention", spy)
    monkeypatch.setattr("qkvlab.nn.attention.GROUPED_READ_MIN_BYTES", 0)
    model = make(config("Q-MQA"))
    x = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        full = model(x)
    decoded, _ = _decode(model, x, 4, fused_rotary=True)
    torch.testing.assert_close(decoded, full, atol=ATOL, rtol=0)
    assert len(seen) == 2 * 6 and all(rot is None for rot in seen)


@pytest.mark.parametrize("tied, untied", [("Q-K=V", "QKV"), ("Q-MQA", "MQA"), ("Q=K=V", "QKV")])
def test_tied_equals_untied_with_copied_weights(tied, untied):
    a = make(config(tied))
    b = make(config(untied))
    _untie(a, b)
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=ATOL, rtol=0)


def test_it_survives_save_and_load(tmp_path):
    model = make(config("Q-MQA"))
    save_model(model, tmp_path / "run")
    loaded = load_model(tmp_path / "run", "cpu")
    assert loaded.config.rotary_values and loaded.backbone.rotary.values
    x = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_llama_export_refuses_in_one_line():
    model = make(config("QKV", norm="rmsnorm", mlp="swiglu"))
    with pytest.raises(QkvlabError, match="rotary_values=True \\(needs False\\); use --format hf") as err:
        to_llama(model)
    assert "\n" not in str(err.value)


def test_the_cost_line_names_it():
    from qkvlab.cost import describe

    assert "rotary positions with rotary values" in describe(config())
    assert "rotary values" not in describe(config(rotary_values=False))


def test_the_default_rotary_module_turns_no_values():
    assert not Rotary(16, 32).values and Rotary(16, 32, values=True).values
