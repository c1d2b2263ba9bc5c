"""Conversion initialisations (keep K, keep V, mean, lsq): lossless when the source already satisfies the
target's constraint, lsq's definition on constructed cases, one-line errors."""

import pytest
import torch

from qkvlab.convert import MERGES, _fit, convert_variant, query_moments
from qkvlab.errors import QkvlabError
from qkvlab.models import ModelConfig, build_model

IDX = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(2))


def _tiny(variant: str = "QKV", heads: int = 4, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(variant=variant, n_layers=2, d_model=32, n_heads=heads, max_seq_len=32, vocab_size=50, **kw)
    return build_model(cfg).eval()


def _layers(model):
    for block in model.backbone.blocks:
        attn = block.attn
        yield attn, attn.qkv.in_features, attn.head_dim


@torch.no_grad()
def _with_equal_kv(model):
    """A QKV model whose value projection (weights and bias) is a copy of its key projection."""
    for attn, d, _ in _layers(model):
        attn.qkv.weight[2 * d:] = attn.qkv.weight[d:2 * d]
        if attn.qkv.bias is not None:
            attn.qkv.bias[2 * d:] = attn.qkv.bias[d:2 * d]
    return model


@torch.no_grad()
def _with_identical_heads(model, groups: int):
    """A QKV model whose key and value heads are identical within each of `groups` consecutive groups."""
    for attn, d, D in _layers(model):
        H = attn.n_heads
        for start in (d, 2 * d):  # keys, then values
            rows = slice(start, start + H * D)
            w = attn.qkv.weight[rows].reshape(groups, H // groups, D, d)
            attn.qkv.weight[rows] = w[:, :1].expand_as(w).reshape(H * D, d)
            b = attn.qkv.bias[rows].reshape(groups, H // groups, D)
            attn.qkv.bias[rows] = b[:, :1].expand_as(b).reshape(H * D)
    return model


def _convert(model, variant, merge):
    return convert_variant(model, variant, merge, calibration=CALIB if merge == "lsq" else None)


@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_equal_k_and_v_convert_to_q_k_v_losslessly(merge, positions):
    model = _with_equal_kv(_tiny(positions=positions))
    converted = _convert(model, "Q-K=V", merge)
    with torch.no_grad():
        want, got = model(IDX), converted(IDX)
    if merge == "lsq":  # a float64 solve of M S = M K, rounded back to float32
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("target, groups", [("GQA-2", 2), ("MQA", 1), ("Q-GQA-2", 2), ("Q-MQA", 1)])
def test_identical_heads_in_each_group_pool_losslessly(merge, target, groups):
    model = _with_identical_heads(_tiny(), groups)
    if target.startswith("Q-"):
        model = _with_equal_kv(model)
    converted = _convert(model, target, merge)
    assert converted.config.n_kv_heads == groups
    with torch.no_grad():
        want, got = model(IDX), converted(IDX)
    if merge == "lsq":
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    else:
        assert torch.equal(got, want)


def test_lsq_is_the_mean_when_queries_and_output_are_isotropic():
    """With A_j and B_j multiples of the identity (equal traces), the fit is the plain mean."""
    g = torch.Generator().manual_seed(0)
    K = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    V = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64).expand(4, 3, 3)
    fitted = _fit([(eye, K), (eye, V)], target=2)  # 4 source heads -> 2 merged heads
    torch.testing.assert_close(fitted, ((K + V) / 2).reshape(2, 2, 3, 5).mean(1))


def test_lsq_follows_the_weighting_of_each_term():
    """A key term that weighs one direction only pins that direction of S to K; the rest follows V."""
    K, V = torch.ones(1, 2, 3, dtype=torch.float64), torch.zeros(1, 2, 3, dtype=torch.float64)
    A = torch.diag(torch.tensor([1e6, 0.0], dtype=torch.float64))[None]
    B = torch.eye(2, dtype=torch.float64)[None]
    fitted = _fit([(A, K), (B, V)], target=1)
    torch.testing.assert_close(fitted[0, 0], torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(fitted[0, 1], torch.zeros(3, dtype=torch.float64))


def test_lsq_differs_from_the_mean_on_a_trained_like_model_and_lowers_its_objective():
    """On a random model lsq is a different projection, and it scores a lower weighted error than the mean."""
    model = _tiny()
    mean = convert_variant(model, "Q-K=V", "mean")
    lsq = convert_variant(model, "Q-K=V", "lsq", calibration=CALIB)
    d = model.config.d_model
    w_mean = mean.backbone.blocks[0].attn.qkv.weight[d:]
    w_lsq = lsq.backbone.blocks[0].attn.qkv.weight[d:]
    assert not torch.allclose(w_mean, w_lsq)
    # the objective of the fit: score error of the source's queries plus value error through W_o
    attn = model.backbone.blocks[0].attn
    moments = query_moments(model, CALIB)[0]  # (H, D, D)
    H, D = attn.n_heads, attn.head_dim
    k = attn.qkv.weight[d:2 * d].double().reshape(H, D, d)
    v = attn.qkv.weight[2 * d:].double().reshape(H, D, d)
    w_o = attn.proj.weight.double().reshape(d, H, D).transpose(0, 1)  # (H, C, D)
    A = moments / moments.diagonal(dim1=-2, dim2=-1).sum(-1).mean()
    B = w_o.transpose(1, 2) @ w_o
    B = B / B.diagonal(dim1=-2, dim2=-1).sum(-1).mean()

    def objective(w):
        s = w.double().reshape(H, D, d)
        return sum(torch.einsum("hde,hdc,hec->", M, X - s, X - s) for M, X in ((A, k), (B, v)))

    assert objective(w_lsq) < objective(w_mean)


def test_query_moments_are_second_moments_of_the_queries():
    model = _tiny()
    moments = query_moments(model, CALIB)
    assert len(moments) == 2 and moments[0].shape == (4, 8, 8)
    x = model.tok_emb(CALIB) + model.backbone.pos_emb(torch.arange(16))
    q = model.backbone.blocks[0].attn.project(model.backbone.blocks[0].norm1(x))[0].double()  # (B, H, T, D)
    want = torch.einsum("bhtd,bhte->hde", q, q) / (4 * 16)
    torch.testing.assert_close(moments[0], want)
    assert model.training is False


def test_lsq_without_calibration_is_one_line():
    with pytest.raises(QkvlabError, match="calibration"):
        convert_variant(_tiny(), "Q-K=V", "lsq")


@pytest.mark.parametrize("merge", ["k", "v"])
def test_keep_k_or_v_after_pooling(merge):
    model = _tiny()
    attn = model.backbone.blocks[0].attn
    d, D = attn.qkv.in_features, attn.head_dim
    part = attn.qkv.weight[d:2 * d] if merge == "k" else attn.qkv.weight[2 * d:]
    pooled = convert_variant(model, "Q-GQA-2", merge).backbone.blocks[0].attn.qkv.weight[d:]
    torch.testing.assert_close(pooled, part.reshape(2, 2, D, d).mean(1).reshape(2 * D, d))
