"""Golden logits: a fixed small seeded model per variant must keep producing the stored numbers.

Any change to initialisation, projections, positions, masks or the blocks that moves these logits
fails here, whether or not it breaks an invariant. After an *intended* numerical change, regenerate
and review the diff of golden.json:

    QKVLAB_REGEN_GOLDEN=1 python -m pytest tests/core/test_golden.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from qkvlab.models import ModelConfig, build_model
from qkvlab.variants import PAPER_VARIANTS

GOLDEN = Path(__file__).with_name("golden.json")
TOLERANCE = dict(atol=1e-4, rtol=1e-4)

# A large init_std makes attention peaked, so a change in scores shows in the logits.
_BASE = dict(n_layers=2, d_model=32, n_heads=4, max_seq_len=16, vocab_size=40, n_classes=5, init_std=0.3)
_SETUPS = {
    "gpt2": dict(kind="decoder", positions="learned"),
    "llama": dict(kind="decoder", positions="rotary", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False),
    "encoder": dict(kind="encoder", positions="sinusoidal"),
    "vit": dict(kind="vit", image_size=8, patch_size=4, in_channels=3, positions="learned"),
}
_VARIANTS = list(PAPER_VARIANTS[:5]) + ["Q=X-K=V", "GQA-2", "MQA", "Q-GQA-2", "Q-MQA", "Q=K-V+", "Q=K=V+"]
CASES = [(setup, v) for setup in ("gpt2", "llama") for v in _VARIANTS] + \
        [(setup, v) for setup in ("encoder", "vit") for v in ("QKV", "Q-K=V", "Q=K=V+", "Q-MQA")]


def _inputs(config: ModelConfig) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if config.kind == "vit":
        return torch.randn(2, 3, 8, 8, generator=g)
    return torch.randint(0, config.vocab_size, (2, 10), generator=g)


def _summary(setup: str, variant: str) -> dict[str, list[float] | float]:
    config = ModelConfig(variant=variant, **_BASE, **_SETUPS[setup])
    with torch.no_grad():
        logits = build_model(config, seed=0).eval()(_inputs(config)).double()
    return {"first": logits.flatten()[:8].tolist(), "last": logits.flatten()[-8:].tolist(),
            "sum": logits.sum().item(), "abs_sum": logits.abs().sum().item()}


def _key(setup: str, variant: str) -> str:
    return f"{setup} {variant}"


def test_regenerate_when_asked():
    if not os.environ.get("QKVLAB_REGEN_GOLDEN"):
        pytest.skip("set QKVLAB_REGEN_GOLDEN=1 to rewrite golden.json")
    golden = {_key(s, v): _summary(s, v) for s, v in CASES}
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")


@pytest.mark.parametrize("setup, variant", CASES, ids=[_key(s, v) for s, v in CASES])
def test_logits_match_the_stored_values(setup, variant):
    expected = json.loads(GOLDEN.read_text())[_key(setup, variant)]
    actual = _summary(setup, variant)
    for field in ("first", "last"):
        torch.testing.assert_close(torch.tensor(actual[field]), torch.tensor(expected[field]), **TOLERANCE)
    assert actual["sum"] == pytest.approx(expected["sum"], abs=1e-5 * expected["abs_sum"])
    assert actual["abs_sum"] == pytest.approx(expected["abs_sum"], rel=1e-5)


def test_the_golden_file_covers_every_case_and_tells_variants_apart():
    golden = json.loads(GOLDEN.read_text())
    assert set(golden) == {_key(s, v) for s, v in CASES}
    sums = [round(entry["abs_sum"], 3) for entry in golden.values()]
    assert len(set(sums)) == len(sums)  # no two cases collapse to the same numbers
