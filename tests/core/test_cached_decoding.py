"""Cached decoding (one token at a time, chunked prefill, ragged batches) equals the full forward."""

from __future__ import annotations

import pytest
import torch

from qkvlab.errors import QkvlabError

from .helpers import assert_close, make, small, variant_grid

VARIANTS = variant_grid()
GRID = [(v, p) for v in VARIANTS for p in ("learned", "rotary")] + [
    (v, "sinusoidal") for v in ("QKV", "Q-K=V", "Q=K=V+", "Q=X/GQA-2")
] + [(v, "none") for v in ("Q-MQA", "Q=K-V+")]

T = 16  # tokens per sequence in the equivalence tests (max_seq_len is 32)


def _tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(seed))


def _decode(model, idx: torch.Tensor, chunks: list[int], **kw) -> torch.Tensor:
    """Feed `idx` through a fresh cache in chunks of the given sizes; concatenated logits."""
    cache = model.make_cache(idx.shape[0])
    outs, start = [], 0
    for n in chunks:
        out = model(idx[:, start:start + n], cache=cache, **kw)
        outs.append(out[0] if kw.get("return_attention") else out)
        start += n
    assert start == idx.shape[1]
    assert cache.lengths.tolist() == [start] * idx.shape[0]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("variant,positions", GRID)
def test_cached_decoding_equals_full_forward(variant, positions):
    model = make(small(variant=variant, positions=positions))
    idx = _tokens(2, T)
    with torch.no_grad():
        full = model(idx)  # (B, T, V)
        one_by_one = _decode(model, idx, [1] * T)
        chunked = _decode(model, idx, [5, 3] + [1] * (T - 8))
        uneven = _decode(model, idx, [1, 7, 2, T - 10])
    assert full.shape == (2, T, 50)
    assert_close(one_by_one, full)
    assert_close(chunked, full)
    assert_close(uneven, full)


@pytest.mark.parametrize("variant", ["QKV", "Q=K=V", "Q-GQA-2", "Q=K-V+", "Q=X-K=V/MQA"])
@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_explicit_attention_path_matches_and_decodes(variant, positions):
    # return_attention computes attention by hand (scores kept); it must agree with SDPA, cached or not.
    model = make(small(variant=variant, positions=positions))
    idx = _tokens(2, T)
    with torch.no_grad():
        full = model(idx)
        explicit, weights = model(idx, return_attention=True)
        chunked = _decode(model, idx, [5, 3] + [1] * (T - 8), return_attention=True)
    assert len(weights) == model.config.n_layers
    assert_close(explicit, full)
    assert_close(chunked, full)


RAGGED = ["QKV", "Q=K-V", "Q-K=V", "Q=K=V", "Q=X", "Q=X-K=V", "GQA-2", "MQA", "Q-GQA-4", "Q-MQA",
          "Q=X/GQA-2", "Q=K-V+", "Q=K=V+", "QKV+", "Q-GQA-2+"]


@pytest.mark.parametrize("variant", RAGGED)
@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_ragged_batch_rows_equal_each_row_alone(variant, positions):
    model = make(small(variant=variant, positions=positions))
    lengths = [7, 3, 5, 1]
    B, P, steps = len(lengths), max(lengths), 6
    idx = _tokens(B, P + steps, seed=2)  # row i's sequence is idx[i, :lengths[i] + steps]
    with torch.no_grad():
        cache = model.make_cache(B)
        prefill = model(idx[:, :P], cache=cache)  # right-padded: row i's tokens after lengths[i] are padding
        cache.set_lengths(lengths)
        pos = torch.tensor(lengths)
        outs = []
        for n in (1, 1, 3, 1):  # one at a time, then a ragged chunk, then one more
            chunk = torch.stack([idx[i, int(pos[i]):int(pos[i]) + n] for i in range(B)])  # (B, n)
            outs.append(model(chunk, cache=cache))
            pos += n
        decoded = torch.cat(outs, dim=1)  # (B, steps, V)
        assert cache.lengths.tolist() == [n + steps for n in lengths]
        for i, n in enumerate(lengths):
            alone = model(idx[i:i + 1, :n + steps])[0]  # (n + steps, V)
            assert_close(prefill[i, :n], alone[:n])
            assert_close(decoded[i], alone[n:])


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
@pytest.mark.parametrize("positions", ["learned", "rotary", "sinusoidal", "none"])
def test_sequence_longer_than_max_seq_len_raises(kind, positions):
    model = make(small(kind=kind, positions=positions, max_seq_len=12))
    with torch.no_grad():
        model(_tokens(1, 12))
        with pytest.raises(QkvlabError):
            model(_tokens(1, 13))


@pytest.mark.parametrize("variant", ["QKV", "Q-K=V", "Q=K=V+"])
@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_cache_overflow_raises_and_leaves_the_cache_usable(variant, positions):
    model = make(small(variant=variant, positions=positions, max_seq_len=12))
    idx = _tokens(2, 12)
    with torch.no_grad():
        full = model(idx)
        cache = model.make_cache(2)
        outs = [model(idx[:, :10], cache=cache), model(idx[:, 10:11], cache=cache)]
        with pytest.raises(QkvlabError):
            model(idx[:, :2], cache=cache)  # 11 + 2 > 12
        assert cache.lengths.tolist() == [11, 11]
        outs.append(model(idx[:, 11:12], cache=cache))
        assert_close(torch.cat(outs, dim=1), full)
        with pytest.raises(QkvlabError):
            model(idx[:, :1], cache=cache)  # 12 + 1 > 12
        # a prefill longer than the model allows, into an empty cache
        with pytest.raises(QkvlabError):
            model(_tokens(2, 13), cache=model.make_cache(2))


def test_short_cache_overflow_raises():
    model = make(small(max_seq_len=32))
    with torch.no_grad():
        cache = model.make_cache(1, max_len=8)
        model(_tokens(1, 6), cache=cache)
        with pytest.raises(QkvlabError):
            model(_tokens(1, 3), cache=cache)  # 6 + 3 > 8, though within max_seq_len
        model(_tokens(1, 2), cache=cache)
        with pytest.raises(QkvlabError):
            model(_tokens(1, 1), cache=cache)


def test_cache_of_another_batch_size_raises():
    model = make(small())
    with pytest.raises(QkvlabError):
        model(_tokens(2, 4), cache=model.make_cache(3))
