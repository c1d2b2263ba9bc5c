"""A tied variant is QKV with some projection weights copied: same weights, same logits.

QKV's fused projection is laid out [q | k | v] with widths `attn.widths`. From a tied model we
build the QKV (or GQA) model whose missing projections are copies: V := K for K = V, Q := K for
Q = K, Q := identity (zero bias) for Q = X. Every other parameter is copied by name.
"""

from __future__ import annotations

import pytest
import torch

from .helpers import assert_close, make, small


def _untie(tied_model, untied_model) -> None:
    """Load `tied_model`'s weights into `untied_model`, expanding the tied projections."""
    target = untied_model.state_dict()
    source = tied_model.state_dict()
    assert set(target) == set(source)
    tied_blocks = tied_model.backbone.blocks
    for i, block in enumerate(untied_model.backbone.blocks):
        attn, tied_attn = block.attn, tied_blocks[i].attn
        assert list(attn.widths) == ["q", "k", "v"] and attn.widths["q"] and attn.widths["v"]
        spec = tied_attn.spec
        for param in ("weight", "bias"):
            name = f"backbone.blocks.{i}.attn.qkv.{param}"
            if name not in source:
                continue
            parts = dict(zip(tied_attn.widths, source[name].split(list(tied_attn.widths.values())), strict=True))
            k = parts["k"]
            v = parts["v"] if spec.has_v_proj else k
            if spec.q_source == "q":
                q = parts["q"]
            elif spec.q_source == "k":
                q = k
            elif param == "weight":
                q = torch.eye(attn.widths["q"], source[name].shape[-1])
            else:
                q = torch.zeros(attn.widths["q"])
            full = torch.cat([q, k, v])
            assert full.shape == target[name].shape
            source = {**source, name: full}
    untied_model.load_state_dict(source, strict=True)


PAIRS = [
    ("Q-K=V", "QKV"),
    ("Q=K-V", "QKV"),
    ("Q=K=V", "QKV"),
    ("Q=X", "QKV"),
    ("Q=X-K=V", "QKV"),
    ("Q-GQA-2", "GQA-2"),
    ("Q-GQA-4", "GQA-4"),
    ("Q-MQA", "MQA"),
    ("Q=X/GQA-2", "GQA-2"),
    ("Q=X-K=V/MQA", "MQA"),
    ("Q=K-V+", "QKV+"),
    ("Q=K=V+", "QKV+"),
    ("Q-GQA-2+", "GQA-2+"),
]


def _inputs(kind: str, config):
    g = torch.Generator().manual_seed(3)
    if kind == "vit":
        return torch.randn(2, config.in_channels, config.image_size, config.image_size, generator=g)
    return torch.randint(0, config.vocab_size, (2, 12), generator=g)


@pytest.mark.parametrize("tied,untied", PAIRS)
@pytest.mark.parametrize("kind", ["decoder", "encoder"])
@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_tied_variant_equals_qkv_with_copied_weights(tied, untied, kind, positions):
    tied_model = make(small(kind=kind, variant=tied, positions=positions), seed=4)
    untied_model = make(small(kind=kind, variant=untied, positions=positions), seed=5)
    x = _inputs(kind, tied_model.config)
    with torch.no_grad():
        before = untied_model(x)
        _untie(tied_model, untied_model)
        expected, actual = untied_model(x), tied_model(x)
    assert (before - expected).abs().max() > 1e-2  # the copy changed something
    assert_close(actual, expected)


@pytest.mark.parametrize("tied,untied", [("Q-K=V", "QKV"), ("Q=K=V", "QKV"), ("Q=X", "QKV"), ("Q-MQA", "MQA")])
def test_tied_vit_equals_qkv_with_copied_weights(tied, untied):
    config = small(kind="vit", image_size=12, patch_size=3, max_seq_len=17)
    tied_model = make(config.replace(variant=tied), seed=4)
    untied_model = make(config.replace(variant=untied), seed=5)
    x = _inputs("vit", config)
    with torch.no_grad():
        _untie(tied_model, untied_model)
        assert_close(tied_model(x), untied_model(x))


@pytest.mark.parametrize("tied,untied", [("Q-K=V", "QKV"), ("Q-MQA", "MQA"), ("Q=X-K=V", "QKV")])
def test_tied_equivalence_without_biases(tied, untied):
    tied_model = make(small(variant=tied, positions="rotary", bias=False), seed=4)
    untied_model = make(small(variant=untied, positions="rotary", bias=False), seed=5)
    x = _inputs("decoder", tied_model.config)
    with torch.no_grad():
        _untie(tied_model, untied_model)
        assert_close(tied_model(x), untied_model(x))


def test_untied_copy_that_breaks_the_tie_differs():
    # Guard against a vacuous comparison: perturb the copied V and the logits must move.
    tied_model = make(small(variant="Q-K=V"), seed=4)
    untied_model = make(small(variant="QKV"), seed=5)
    x = _inputs("decoder", tied_model.config)
    with torch.no_grad():
        _untie(tied_model, untied_model)
        w = untied_model.backbone.blocks[0].attn.qkv.weight
        w[-8:] += 0.5
        assert (tied_model(x) - untied_model(x)).abs().max() > 1e-3
