"""The analysis measures on constructed cases, on a model's held-out task inputs, and `qkvlab analyze`."""

from __future__ import annotations

import json

import pytest
import torch

from qkvlab.analysis import effective_rank, held_out_inputs, projection_similarity, score_asymmetry
from qkvlab.cli.main import main
from qkvlab.models import ModelConfig, build_model
from qkvlab.models.io import save_model


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_rank_r_matrix_has_effective_rank_r(rank):
    g = torch.Generator().manual_seed(rank)
    u, _ = torch.linalg.qr(torch.randn(40, rank, generator=g, dtype=torch.float64))  # (40, r) orthonormal
    v, _ = torch.linalg.qr(torch.randn(12, rank, generator=g, dtype=torch.float64))  # (12, r)
    assert effective_rank(u @ v.T) == pytest.approx(rank, rel=1e-6)  # equal singular values: exactly r
    noisy = (torch.randn(40, rank, generator=g, dtype=torch.float64)
             @ torch.randn(rank, 12, generator=g, dtype=torch.float64))  # unequal singular values
    assert 1.0 - 1e-6 <= effective_rank(noisy) <= rank + 1e-6


def test_score_asymmetry_of_constructed_matrices():
    a = torch.randn(3, 2, 6, 6)  # (B, H, T, T)
    assert score_asymmetry(a + a.transpose(-2, -1)) == pytest.approx(0.0, abs=1e-12)
    skew = a - a.transpose(-2, -1)
    assert score_asymmetry(skew) == pytest.approx(2.0)  # ‖2S‖/‖S‖ for antisymmetric S, the maximum
    assert 0.0 < score_asymmetry(a) < 2.0


@pytest.mark.parametrize("variant, positions", [("Q=K-V", "learned"), ("Q=K=V", "rotary")])
def test_tied_query_and_key_give_symmetric_scores(variant, positions):
    torch.manual_seed(0)
    model = build_model(ModelConfig(variant=variant, n_layers=2, d_model=32, n_heads=4, positions=positions))
    stats = projection_similarity(model, torch.randint(0, 256, (2, 16)))
    for s in stats:
        assert s["asym"] == pytest.approx(0.0, abs=1e-6)  # scores before the causal mask
        assert s["cos_qk"] == pytest.approx(1.0)
    qkv = projection_similarity(build_model(ModelConfig(n_layers=1, d_model=32, n_heads=4)),
                                torch.randint(0, 256, (2, 16)))
    assert qkv[0]["asym"] > 0.1


def test_identical_k_and_v_give_cosine_one():
    torch.manual_seed(0)
    (s,) = projection_similarity(build_model(ModelConfig(variant="Q-K=V", n_layers=1, d_model=32, n_heads=4)),
                                 torch.randint(0, 256, (2, 16)))
    assert s["cos_kv"] == pytest.approx(1.0) and s["rank_k"] == pytest.approx(s["rank_v"])


class _Task:
    """A stand-in task whose evaluation calls the model on held-out batches (and must stop at the first)."""

    name = "stand-in"

    def __init__(self):
        self.calls = 0

    def model_config(self, variant, preset="quick"):
        return ModelConfig(variant=variant, n_layers=1, d_model=32, n_heads=4, vocab_size=256)

    def evaluate(self, model, batch_size, max_batches=None):
        for i in range(100):
            self.calls += 1
            model(torch.full((batch_size, 8), i))
        return {}


def test_held_out_inputs_are_the_first_evaluation_batch():
    model = build_model(ModelConfig(n_layers=1, d_model=32, n_heads=4))
    task = _Task()
    args, kwargs = held_out_inputs(model, task, 3)
    assert task.calls == 1 and args[0].shape == (3, 8) and int(args[0].max()) == 0 and kwargs == {}
    other = _Task()
    other.model_config = lambda variant, preset="quick": ModelConfig(n_layers=1, d_model=32, n_heads=4, vocab_size=99)
    with pytest.raises(ValueError, match="does not match the model .*vocab_size 99 vs 256"):
        held_out_inputs(model, other, 3)


def test_analyze_cli_random_inputs_are_labelled(tmp_path, capsys):
    save_model(build_model(ModelConfig(n_layers=2, d_model=32, n_heads=4)), tmp_path / "m")
    assert main(["analyze", str(tmp_path / "m"), "--random-inputs", "--batch", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["random_inputs"] is True and "RANDOM" in out["inputs"] and len(out["layers"]) == 3
    assert main(["analyze", str(tmp_path / "m")]) == 2  # no task recorded, no flag: refused
    err = capsys.readouterr().err
    assert "--random-inputs" in err and len(err.strip().splitlines()) == 1
    assert main(["analyze", str(tmp_path / "m"), "--random-inputs", "--batch", "100000000"]) == 2
    assert "--batch 100000000 is too large" in capsys.readouterr().err
