"""`qkvlab.nn.Attention` on its own: explicit arguments, `attn(x)` without a context, a drop-in for
`nn.MultiheadAttention`, and the same numbers as inside our models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qkvlab.errors import QkvlabError
from qkvlab.nn import Attention
from qkvlab.nn.positions import PairBias, Rotary

from .helpers import assert_close, make, small


def test_standalone_attention_equals_the_layer_inside_a_model():
    torch.manual_seed(0)
    attn = Attention(d_model=64, n_heads=4, variant="Q-K=V")
    x = torch.randn(2, 5, 64)
    y = attn(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 5, 64)
    assert [name for name, width in attn.widths.items() if width] == ["q", "k"]
    # the same layer inside an encoder (bidirectional, no positions) with copied weights
    model = make(small(kind="encoder", variant="Q-K=V", n_heads=4, positions="none"))
    inner = model.backbone.blocks[0].attn
    inner.load_state_dict(attn.state_dict())
    seen = {}
    inner.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    with torch.no_grad():
        model(torch.randint(0, 50, (2, 5)))
        assert_close(attn(seen["x"]), seen["out"])
        assert (seen["out"] - attn(seen["x"] + 0.1)).abs().max() > 1e-3  # the comparison can fail


@pytest.mark.parametrize("variant, positions", [("QKV", "rotary"), ("Q-K=V", "rotary"), ("Q=K=V+", "learned"),
                                                ("Q-GQA-2", "rotary"), ("Q=X", "learned")])
def test_causal_standalone_equals_the_decoder_layer(variant, positions):
    model = make(small(variant=variant, positions=positions))
    inner = model.backbone.blocks[1].attn
    attn = Attention(64, 8, variant, causal=True, rotary=Rotary(8, 32) if positions == "rotary" else None,
                     pair_bias=PairBias(32, 32) if variant.endswith("+") else None).eval()
    attn.load_state_dict(inner.state_dict())
    seen = {}
    inner.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    with torch.no_grad():
        model(torch.randint(0, 50, (2, 9)))
        assert_close(attn(seen["x"]), seen["out"])


def test_n_kv_heads_and_variant_strings():
    assert Attention(64, 8, "QKV", n_kv_heads=2).spec.name == "GQA-2"
    assert Attention(64, 8, "Q-K=V", n_kv_heads=2).spec.name == "Q-GQA-2"
    assert Attention(64, 8, "Q-MQA", n_kv_heads=2).n_kv_heads == 1  # the variant's own sharing wins
    assert Attention(64, 8, "tied-kv").spec.name == "Q-K=V"
    for bad in (dict(variant="Q=K-V", n_kv_heads=2), dict(n_heads=5), dict(variant="Q=K=V+"),
                dict(variant="QKV", pair_bias=PairBias(8, 8)), dict(variant="Q=X", head_dim=4), dict(dropout=1.0)):
        with pytest.raises(QkvlabError):
            Attention(**{"d_model": 64, "n_heads": 8, **bad})


class _EncoderLayer(nn.Module):
    """A post-norm layer like `nn.TransformerEncoderLayer`, with its attention as an argument."""

    def __init__(self, attn: nn.Module, d_model: int = 64):
        super().__init__()
        self.attn, self.norm = attn, nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, 128), nn.GELU(), nn.Linear(128, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn(x, x, x, need_weights=False)[0] if isinstance(self.attn, nn.MultiheadAttention) else self.attn(x)
        x = self.norm(x + a)
        return self.norm(x + self.ff(x))


def test_drop_in_replacement_for_multihead_attention():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=True)
    layer = _EncoderLayer(mha).eval()
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        expected = layer(x)
        attn = Attention(d_model=64, n_heads=4)  # QKV: same layout as in_proj_weight [q | k | v]
        attn.qkv.load_state_dict({"weight": mha.in_proj_weight, "bias": mha.in_proj_bias})
        attn.proj.load_state_dict(mha.out_proj.state_dict())
        layer.attn = attn
        assert_close(layer(x), expected)
        layer.attn = Attention(d_model=64, n_heads=4, variant="Q-K=V")  # now one K = V projection
        assert layer(x).shape == expected.shape


def test_rotary_angles_follow_the_model_precision():
    rotary = Rotary(8, 4096)
    positions = torch.arange(4000)
    assert rotary.tables(positions).dtype == torch.complex64
    exact = rotary.tables(positions, torch.float64)
    assert exact.dtype == torch.complex128
    angles = positions.double()[:, None] * 10000.0 ** (-torch.arange(0, 8, 2).double() / 8)
    assert (exact - torch.polar(torch.ones_like(angles), angles)).abs().max() < 1e-12
    x = torch.randn(1, 2, 4000, 8, dtype=torch.float64)
    assert rotary(x, positions).dtype == torch.float64
    assert (rotary(x, positions).norm(dim=-1) - x.norm(dim=-1)).abs().max() < 1e-12  # a rotation, in float64


def test_float64_model_decodes_with_float64_rotations():
    model = make(small(variant="Q-K=V", positions="rotary")).double()
    idx = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)
        cache = model.make_cache(2)
        steps = torch.cat([model(idx[:, i:i + 1], cache=cache) for i in range(10)], dim=1)
    assert full.dtype == torch.float64 and cache.workspace_nbytes and cache._workspace.dtype == torch.complex128
    torch.testing.assert_close(steps, full, atol=1e-11, rtol=0)


@pytest.mark.parametrize("variant", ["QKV", "Q-K=V", "Q-GQA-2", "Q=K=V+"])
def test_cpu_autocast_runs_the_attention_kernel_in_float32(variant, monkeypatch):
    """Under CPU bfloat16 autocast the projections run in bfloat16 but SDPA gets float32 (its bfloat16 CPU backward
    is several times slower); the gradients stay those of float32 training within bfloat16 rounding."""
    torch.manual_seed(0)
    attn = Attention(64, 8, variant, n_kv_heads=None, causal=not variant.endswith("+"),
                     pair_bias=PairBias(16, 16) if variant.endswith("+") else None)
    x = torch.randn(2, 16, 64)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append((q.dtype, k.dtype, v.dtype)) or sdpa(q, k, v, **kw))

    def grads(autocast: bool) -> list[torch.Tensor]:
        attn.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            attn(x).float().square().mean().backward()
        return [p.grad.clone() for p in attn.parameters()]

    full, mixed = grads(False), grads(True)
    assert seen == [(torch.float32,) * 3] * 2
    a, b = torch.cat([g.flatten() for g in full]), torch.cat([g.flatten() for g in mixed])
    assert (a - b).norm() <= 0.05 * a.norm()
    assert any(not torch.equal(a, b) for a, b in zip(full, mixed, strict=True))  # bfloat16 did run
