"""Initialisation: GPT-2 statistics, and for one seed, what two variants share starts identical."""

from __future__ import annotations

import math

import pytest
import torch

from qkvlab.models import build_model

from .helpers import small


def _parts(model) -> dict[str, torch.Tensor]:
    """Every parameter by name, with fused attention projections split into their q, k, v parts."""
    parts = {}
    for name, p in model.named_parameters():
        if ".attn.qkv." not in name:
            parts[name] = p.detach()
    for i, block in enumerate(model.backbone.blocks):
        for part, (w, b) in block.attn.projection_weights().items():
            parts[f"backbone.blocks.{i}.attn.{part}.weight"] = w.detach()
            if b is not None:
                parts[f"backbone.blocks.{i}.attn.{part}.bias"] = b.detach()
    return parts


# variant -> the projections it shares with QKV
SHARED = {"Q-K=V": "qk", "Q=K-V": "kv", "Q=K=V": "k", "Q=X": "kv", "Q=X-K=V": "k"}


@pytest.mark.parametrize("variant", list(SHARED))
@pytest.mark.parametrize("kind", ["decoder", "encoder", "vit"])
def test_variants_with_one_seed_share_their_common_parts(variant, kind):
    extra = dict(max_seq_len=17) if kind == "vit" else {}
    base = _parts(build_model(small(kind=kind, variant="QKV", **extra), seed=7))
    tied = _parts(build_model(small(kind=kind, variant=variant, **extra), seed=7))
    attn_parts = {n for n in base if ".attn." in n and ".attn.proj." not in n}
    projections = {n.split(".attn.")[1][0] for n in tied if n in attn_parts}
    assert projections == set(SHARED[variant])
    for name, value in tied.items():
        assert torch.equal(value, base[name]), name
    assert set(tied) == set(base) - {n for n in attn_parts if n.split(".attn.")[1][0] not in SHARED[variant]}


def test_grouped_and_plus_variants_share_everything_else():
    base = _parts(build_model(small(variant="QKV"), seed=3))
    for variant in ("GQA-2", "Q-MQA", "Q=K=V+"):
        other = _parts(build_model(small(variant=variant), seed=3))
        same = [n for n in other if n in base and other[n].shape == base[n].shape]
        assert {n for n in base if ".attn." not in n or ".attn.proj." in n} <= set(same), variant
        for name in same:
            assert torch.equal(other[name], base[name]), (variant, name)


def test_seeds_differ_and_the_global_generator_decides_by_default():
    a, b = build_model(small(), seed=0), build_model(small(), seed=1)
    assert not torch.equal(a.tok_emb.weight, b.tok_emb.weight)
    torch.manual_seed(5)
    c = build_model(small())
    d = build_model(small())  # the global generator moved on: another draw
    torch.manual_seed(5)
    e = build_model(small(variant="Q-K=V"))
    assert not torch.equal(c.tok_emb.weight, d.tok_emb.weight)
    assert torch.equal(c.tok_emb.weight, e.tok_emb.weight)
    assert torch.equal(c.backbone.blocks[1].mlp.fc.weight, e.backbone.blocks[1].mlp.fc.weight)


def test_gpt2_statistics():
    config = small(n_layers=4, d_model=128, n_heads=8, vocab_size=500, d_mlp=512)
    model = build_model(config, seed=0)
    residual_std = 0.02 / math.sqrt(2 * config.n_layers)
    for name, p in model.named_parameters():
        if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
            assert p.std().item() == pytest.approx(residual_std, rel=0.05), name
        elif p.dim() == 2:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
            assert abs(p.mean().item()) < 0.002, name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:  # norm gains
            assert torch.all(p == 1), name
    for part, (w, _) in model.backbone.blocks[0].attn.projection_weights().items():
        assert w.std().item() == pytest.approx(0.02, rel=0.05), part
    q, k, _ = model.backbone.blocks[0].attn.projection_weights().values()
    assert not torch.equal(q[0], k[0])  # parts are drawn independently
