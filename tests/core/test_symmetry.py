"""With Q = K (and no "+" bias) the score matrix K Kᵀ is symmetric before masking; otherwise not."""

from __future__ import annotations

import pytest
import torch

from qkvlab.variants import parse_variant

from .helpers import make, small, variant_grid


def _attention(kind: str, variant: str, positions: str, T: int = 10):
    if kind == "vit":
        config = small(kind="vit", variant=variant, positions=positions, image_size=9, patch_size=3, max_seq_len=10)
        x = torch.randn(2, 1, 9, 9, generator=torch.Generator().manual_seed(6))
        T = 10
    else:
        config = small(kind=kind, variant=variant, positions=positions)
        x = torch.randint(0, 50, (2, T), generator=torch.Generator().manual_seed(6))
    model = make(config, seed=7)
    with torch.no_grad():
        out, weights = model(x, return_attention=True)
    assert len(weights) == config.n_layers
    for w in weights:
        assert set(w) == {"scores", "probs"}
        assert w["scores"].shape == w["probs"].shape == (2, config.n_heads, T, T)
        assert torch.isfinite(w["scores"]).all()  # scores are taken before any mask
        torch.testing.assert_close(w["probs"].sum(-1), torch.ones(2, config.n_heads, T))
    return model, weights


def _asymmetry(scores: torch.Tensor) -> float:
    return (scores - scores.transpose(-2, -1)).abs().max().item()


@pytest.mark.parametrize("variant", ["Q=K-V", "Q=K=V"])
@pytest.mark.parametrize("kind", ["encoder", "decoder", "vit"])
@pytest.mark.parametrize("positions", ["learned", "rotary", "none"])
def test_query_tied_to_key_gives_symmetric_scores(variant, kind, positions):
    _, weights = _attention(kind, variant, positions)
    for w in weights:
        assert w["scores"].abs().max() > 0.5  # not trivially symmetric
        assert _asymmetry(w["scores"]) < 1e-5


@pytest.mark.parametrize("variant", ["Q=K-V+", "Q=K=V+", "QKV", "Q-K=V", "Q=X", "MQA", "Q-GQA-2"])
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_other_variants_give_asymmetric_scores(variant, kind, positions):
    _, weights = _attention(kind, variant, positions)
    for w in weights:
        assert _asymmetry(w["scores"]) > 1e-2


@pytest.mark.parametrize("variant", variant_grid())
def test_spec_symmetric_says_what_the_model_does(variant):
    _, weights = _attention("encoder", variant, "rotary")
    measured = all(_asymmetry(w["scores"]) < 1e-5 for w in weights)
    assert measured == parse_variant(variant).symmetric


@pytest.mark.parametrize("variant", ["Q=K-V", "Q=K=V", "QKV"])
def test_decoder_probs_are_causal(variant):
    _, weights = _attention("decoder", variant, "learned")
    upper = torch.ones(10, 10, dtype=torch.bool).triu(1)
    for w in weights:
        assert (w["probs"][..., upper] == 0).all()
        assert (w["probs"][..., ~upper] > 0).all()
