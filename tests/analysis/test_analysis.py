import pytest
import torch

from qkvlab.analysis import effective_rank, projection_similarity
from qkvlab.models import ModelConfig, build_model


def test_effective_rank_of_identity_and_rank_one():
    assert effective_rank(torch.eye(7)) == pytest.approx(7.0)
    assert effective_rank(torch.outer(torch.arange(1.0, 6), torch.arange(1.0, 4))) == pytest.approx(1.0)


@pytest.mark.parametrize("variant, one", [("Q-K=V", "cos_kv"), ("Q=K-V", "cos_qk"), ("Q-MQA", "cos_kv")])
def test_tied_projections_have_cosine_one(variant, one):
    torch.manual_seed(0)
    model = build_model(ModelConfig(variant=variant, n_layers=2, d_model=32, n_heads=4))
    stats = projection_similarity(model, torch.randint(0, 256, (2, 16)))
    assert [s["layer"] for s in stats] == [0, 1]
    for s in stats:
        assert s[one] == pytest.approx(1.0)
        assert abs(s["cos_qv" if one == "cos_kv" else "cos_kv"]) < 0.5
        assert 1 <= s["rank_k"] <= 32
