"""Partial rotary (`ModelConfig.rotary_fraction`): only the first rotary_dim dims of each head rotate.

Cached decoding equals the full forward for every fraction (K = V included, whose keys are rotated
when read, only that slice); the unrotated dims are position-independent; the default (1.0) is the
plain rotary path, bit for bit; the config is validated once and survives save/load.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkvlab.cost import describe
from qkvlab.errors import QkvlabError
from qkvlab.hf.export import rotary_rows
from qkvlab.interop.llama import rotary_order
from qkvlab.models import ModelConfig
from qkvlab.models.io import load_model, save_model
from qkvlab.nn.positions import Rotary, apply_rotary

from .helpers import assert_close, make

VARIANTS = ("QKV", "Q-K=V", "Q-MQA")


def config(variant: str = "Q-K=V", fraction: float = 1.0, n_heads: int = 4, head_dim: int = 16, **kw) -> ModelConfig:
    base = dict(kind="decoder", variant=variant, n_layers=2, d_model=n_heads * head_dim, n_heads=n_heads,
                max_seq_len=24, vocab_size=50, positions="rotary", rotary_fraction=fraction)
    base.update(kw)
    return ModelConfig(**base)


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(seed))


def decode(model, idx: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits of `idx` fed through a fresh cache in chunks of the given sizes."""
    cache = model.make_cache(idx.shape[0])
    starts = [sum(chunks[:i]) for i in range(len(chunks))]
    return torch.cat([model(idx[:, s:s + n], cache) for s, n in zip(starts, chunks, strict=True)], dim=1)


# --- validation ----------------------------------------------------------------------------

@pytest.mark.parametrize("kw, message", [
    (dict(positions="learned", rotary_fraction=0.5), "rotary_fraction=0.5 needs positions='rotary'"),
    (dict(rotary_fraction=0.0), "rotary_fraction=0.0 must be in \\(0, 1\\]"),
    (dict(rotary_fraction=1.5), "rotary_fraction=1.5 must be in"),
    (dict(rotary_fraction=-0.25), "rotary_fraction=-0.25 must be in"),
    (dict(rotary_fraction=0.0625), "head_dim \\(16\\) an even integer"),  # 1 dim: odd
    (dict(rotary_fraction=0.3), "accepted: 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1$"),
    (dict(rotary_fraction=True), "rotary_fraction must be a number, got True"),
    (dict(rotary_fraction="0.5"), "rotary_fraction must be a number"),
])
def test_invalid_fractions_are_refused_in_one_line(kw, message):
    with pytest.raises(QkvlabError, match=message) as err:
        config(**kw)
    assert "\n" not in str(err.value)


def test_valid_fractions_and_rotary_dim():
    assert config(fraction=0.25).rotary_dim == 4 and config().rotary_dim == 16
    assert config(fraction=1).rotary_fraction == 1.0 and isinstance(config(fraction=1).rotary_fraction, float)
    assert ModelConfig(positions="learned").rotary_fraction == 1.0  # the default is fine with any positions
    assert config(fraction=0.75, head_dim=8).rotary_dim == 6
    assert "rotating 4 of 16 dims per head" in describe(config(fraction=0.25))
    assert "rotating" not in describe(config())


# --- the default is today's rotary, bit for bit ---------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_fraction_one_is_the_default_path_bit_for_bit(variant):
    default = config(variant)
    default = ModelConfig(**{k: v for k, v in default.to_dict().items() if k != "rotary_fraction"})
    explicit = config(variant, 1.0)
    idx = tokens(2, 12)
    logits = {}
    for name, cfg in (("default", default), ("explicit", explicit)):
        model = make(cfg)
        with torch.no_grad():
            logits[name] = model(idx), decode(model, idx, [5] + [1] * 7)
    assert torch.equal(logits["explicit"][0], logits["default"][0])
    assert torch.equal(logits["explicit"][1], logits["default"][1])
    positions = torch.arange(12)
    assert torch.equal(Rotary(16, 24, rotary_dim=16).tables(positions), Rotary(16, 24).tables(positions))


# --- cached decoding equals the full forward --------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(variant=st.sampled_from(VARIANTS), fraction=st.sampled_from([0.25, 0.5, 1.0]),
       n_heads=st.sampled_from([2, 4]), head_dim=st.sampled_from([8, 16]), length=st.integers(2, 12),
       prefill=st.integers(1, 11), batch=st.integers(1, 2))
def test_cached_decoding_equals_full_forward(variant, fraction, n_heads, head_dim, length, prefill, batch):
    model = make(config(variant, fraction, n_heads, head_dim))
    idx = tokens(batch, length)
    prefill = min(prefill, length - 1)
    with torch.no_grad():
        full = model(idx)  # (B, T, V)
        assert_close(decode(model, idx, [1] * length), full)
        assert_close(decode(model, idx, [prefill] + [1] * (length - prefill)), full)


@pytest.mark.parametrize("variant", ["Q-K=V", "Q-MQA", "Q=K=V", "Q=K=V+", "Q=X-K=V"])
def test_partial_k_equals_v_reads_split_keys_and_matches_full_forward(variant):
    # One-token decoding reads the unrotated key dims in place (the split path); the full forward of
    # 16 tokens concatenates them; both agree, and the workspace holds only the rotated quarter.
    cfg = config(variant, 0.25)
    model = make(cfg)
    attn = model.backbone.blocks[0].attn
    assert attn._split_read(1, cfg.rotary_dim) and not attn._split_read(16, cfg.rotary_dim)
    idx = tokens(2, 16)
    cache = model.make_cache(2)
    with torch.no_grad():
        full = model(idx)
        stepped = torch.cat([model(idx[:, i:i + 1], cache) for i in range(16)], dim=1)
    assert_close(stepped, full)
    pairs = cfg.rotary_dim // 2  # complex64 rotated pairs of one layer's keys, the whole cache length
    assert cache.workspace_nbytes == 2 * cfg.n_kv_heads * cfg.max_seq_len * pairs * 8
    assert cache.workspace_nbytes * 4 == cache.nbytes // cfg.n_layers  # a quarter of one layer's cache


@pytest.mark.parametrize("variant", ["Q-K=V", "Q-GQA-2", "Q=K=V+"])
def test_split_and_concatenated_key_reads_agree_with_gradients(variant):
    # The same layer with the split read forced off: equal outputs and gradients (training, dropout off).
    outs, grads = [], []
    for split in (True, False):
        model = make(config(variant, 0.25))
        for block in model.backbone.blocks:
            block.attn._split_read = lambda n_queries, rotary_dim, split=split: split
        model.train()
        logits = model(tokens(2, 6))
        logits.square().mean().backward()
        outs.append(logits.detach())
        grads.append(model.backbone.blocks[0].attn.qkv.weight.grad)
    assert_close(outs[0], outs[1])
    assert_close(grads[0], grads[1])


@pytest.mark.parametrize("variant", ["Q-K=V", "Q-MQA"])
def test_ragged_batch_rows_equal_each_row_alone(variant):
    # Rows of different lengths share a cache: per-row masks on the split path.
    model = make(config(variant, 0.5))
    lengths, steps = [7, 3, 5], 5
    idx = tokens(3, max(lengths) + steps, seed=2)  # row i's sequence is idx[i, :lengths[i] + steps]
    with torch.no_grad():
        cache = model.make_cache(3)
        model(idx[:, :max(lengths)], cache)  # right-padded prefill
        cache.set_lengths(lengths)
        pos, outs = torch.tensor(lengths), []
        for n in (1, 1, 2, 1):  # one at a time, then a ragged chunk of two, then one more
            outs.append(model(torch.stack([idx[i, int(pos[i]):int(pos[i]) + n] for i in range(3)]), cache))
            pos += n
        decoded = torch.cat(outs, dim=1)  # (B, steps, V)
        for i, n in enumerate(lengths):
            assert_close(decoded[i], model(idx[i:i + 1, :n + steps])[0, n:])


# --- the unrotated dims -----------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(rotary_dim=st.sampled_from([2, 4, 8, 12]), seed=st.integers(0, 2**16))
def test_unrotated_dims_pass_through_and_rotated_dims_rotate_alone(rotary_dim, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 7, 16, generator=g)  # (B, H, T, D)
    positions = torch.randint(0, 64, (2, 7), generator=g)
    out = Rotary(16, 64, rotary_dim=rotary_dim)(x, positions)
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])  # exactly position-independent
    assert torch.equal(out[..., :rotary_dim], Rotary(rotary_dim, 64)(x[..., :rotary_dim], positions))
    # q·k depends on positions only through their offset, in the rotated dims; not at all in the rest
    q, k = x[:, :, :1], x[:, :, 1:2]
    shift = int(torch.randint(0, 32, (), generator=g))
    rot = Rotary(16, 64, rotary_dim=rotary_dim)
    dot = (rot(q, torch.tensor([5])) * rot(k, torch.tensor([2]))).sum(-1)
    shifted = (rot(q, torch.tensor([5 + shift])) * rot(k, torch.tensor([2 + shift]))).sum(-1)
    assert_close(shifted, dot, atol=1e-4)


def test_hugging_face_half_split_layout_maps_to_ours():
    # transformers' partial rotary (GPT-NeoX style): rotate_half over the first R dims, with
    # frequencies theta^(-2i/R). Our interleaved pairs give the same numbers after rotary_order.
    D, R, theta = 16, 8, 10000.0
    x = torch.randn(1, 2, 5, D, generator=torch.Generator().manual_seed(0))  # (B, H, T, D), their layout
    pos = torch.arange(5)
    inv_freq = theta ** (-torch.arange(0, R, 2).float() / R)  # (R/2,)
    angles = torch.cat([pos[:, None] * inv_freq] * 2, dim=-1)  # (T, R)
    rot, rest = x[..., :R], x[..., R:]
    half = torch.cat([-rot[..., R // 2:], rot[..., :R // 2]], dim=-1)
    theirs = torch.cat([rot * angles.cos() + half * angles.sin(), rest], dim=-1)
    order = rotary_order(D, R)
    ours = Rotary(D, 64, theta, rotary_dim=R)(x[..., order], pos)
    assert_close(ours, theirs[..., order])
    # export's row order is the inverse of import's, per head
    assert torch.equal(rotary_rows(1, D, R)[order], torch.arange(D))
    assert torch.equal(rotary_rows(2, D, R)[:D], rotary_rows(1, D, R))
    assert torch.equal(apply_rotary(x, Rotary(D, 64, rotary_dim=R).tables(pos))[..., R:], rest)


# --- save / load ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["QKV", "Q-K=V"])
def test_save_load_round_trip(tmp_path, variant):
    model = make(config(variant, 0.5))
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.config.rotary_fraction == 0.5 and loaded.config == model.config
    idx = tokens(2, 10)
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
        assert_close(decode(loaded, idx, [4] + [1] * 6), model(idx))


# --- deployment -----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["QKV", "Q-K=V"])
def test_exported_decoder_generates_the_same_tokens(variant):
    # The .pt2 / .pte StaticDecoder has its own rotary arithmetic: it must rotate the same slice.
    from qkvlab.deploy.pt2 import StaticDecoder, export_programs, generate_with
    from qkvlab.generate import SamplingConfig, generate

    model = make(config(variant, 0.25, max_seq_len=32))
    decoder = StaticDecoder(model, 24)
    programs = export_programs(decoder)
    sampling = SamplingConfig(max_new_tokens=12, temperature=0)
    prompt = [1, 2, 3, 4, 5, 6, 7]
    ours = generate_with(programs["prefill"].module(), programs["decode"].module(), decoder.empty_cache(), prompt,
                         sampling, 24, 50)
    assert ours == generate(model, [prompt], sampling)[0]
