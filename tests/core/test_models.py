"""Structural invariants of the built models: shapes, equivariance, masks, dropout, tying, sizes."""

from __future__ import annotations

import pytest
import torch

from qkvlab.models import GPT, Encoder, ViT, build_model

from .helpers import assert_close, make, small, variant_grid


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --- ViT ------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["QKV", "Q-K=V", "Q=K=V+", "Q-MQA"])
@pytest.mark.parametrize("channels,image,patch", [(1, 28, 7), (3, 32, 8)])
def test_vit_classification_shape(variant, channels, image, patch):
    config = small(kind="vit", variant=variant, in_channels=channels, image_size=image, patch_size=patch,
                   max_seq_len=(image // patch) ** 2 + 1, n_classes=10)
    model = make(config)
    with torch.no_grad():
        logits = model(torch.randn(2, channels, image, image))
    assert logits.shape == (2, 10)


@pytest.mark.parametrize("variant", ["QKV", "Q-K=V", "Q=K=V+"])
def test_vit_dense_head_shape_and_pixel_layout(variant):
    config = small(kind="vit", variant=variant, in_channels=3, image_size=12, patch_size=4, max_seq_len=10,
                   n_classes=5, dense_head=True)
    model = make(config)
    hidden = {}
    model.backbone.register_forward_hook(lambda m, args, out: hidden.setdefault("h", out))
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 12, 12))
        per_patch = model.head(hidden["h"][:, 1:])  # (B, 9, 5*4*4)
    assert logits.shape == (2, 5, 12, 12)
    # pixel (r, c) of patch (pr, pc) reads class k from per_patch[:, pr*3+pc] viewed as (5, 4, 4)
    for pr in range(3):
        for pc in range(3):
            block = logits[:, :, 4 * pr:4 * pr + 4, 4 * pc:4 * pc + 4]
            assert_close(block, per_patch[:, 3 * pr + pc].view(2, 5, 4, 4))


def test_vit_per_patch_logits_give_the_same_pixel_loss_and_gradients():
    """The segmentation loss reads logits in patch order (no strided copy); it is the image-order loss."""
    import torch.nn.functional as F

    from qkvlab.models.vit import patch_order

    config = small(kind="vit", variant="Q-K=V", in_channels=1, image_size=12, patch_size=4, max_seq_len=10,
                   n_classes=5, dense_head=True)
    model = make(config).double()
    images, labels = torch.randn(3, 1, 12, 12).double(), torch.randint(0, 5, (3, 12, 12))
    image_loss = F.cross_entropy(model(images), labels)
    image_grads = torch.autograd.grad(image_loss, list(model.parameters()))
    logits = model(images, per_patch=True)
    assert logits.shape == (3, 9, 5, 16)
    patch_loss = F.cross_entropy(logits.flatten(0, 1), patch_order(labels, 4).flatten(0, 1))
    patch_grads = torch.autograd.grad(patch_loss, list(model.parameters()))
    assert_close(patch_loss, image_loss, atol=1e-12)
    for a, b in zip(patch_grads, image_grads, strict=True):
        assert_close(a, b, atol=1e-12)
    assert patch_order(torch.arange(16).view(1, 4, 4), 2).tolist() == [[[0, 1, 4, 5], [2, 3, 6, 7],
                                                                         [8, 9, 12, 13], [10, 11, 14, 15]]]


def test_build_model_returns_the_kind():
    assert isinstance(build_model(small(kind="decoder")), GPT)
    assert isinstance(build_model(small(kind="encoder")), Encoder)
    assert isinstance(build_model(small(kind="vit", max_seq_len=17)), ViT)


# --- encoder -------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["QKV", "Q=K-V", "Q-K=V", "Q=K=V", "Q=X", "Q-MQA", "Q=X-K=V/GQA-2"])
def test_set_encoder_without_positions_is_permutation_equivariant(variant):
    model = make(small(kind="encoder", variant=variant, input_dim=5, positions="none"))
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 10, 5, generator=g)
    perm = torch.randperm(10, generator=g)
    with torch.no_grad():
        out, out_perm = model(x), model(x[:, perm])
    assert out.shape == (3, 10, model.config.n_classes)
    assert_close(out_perm, out[:, perm])
    assert (out - out[:, perm]).abs().max() > 1e-2  # the permutation matters


@pytest.mark.parametrize("variant", ["QKV", "Q-K=V", "Q=K=V", "Q=K-V+", "Q-MQA", "Q=X"])
@pytest.mark.parametrize("positions", ["learned", "rotary", "sinusoidal"])
def test_encoder_padding_does_not_reach_real_positions(variant, positions):
    model = make(small(kind="encoder", variant=variant, positions=positions))
    g = torch.Generator().manual_seed(12)
    lengths = [10, 6, 3]
    idx = torch.randint(0, 50, (3, 10), generator=g)
    mask = torch.arange(10)[None, :] < torch.tensor(lengths)[:, None]  # (B, T) True = real
    other = torch.where(mask, idx, torch.randint(0, 50, (3, 10), generator=g))  # different padding
    with torch.no_grad():
        out, out_other = model(idx, padding_mask=mask), model(other, padding_mask=mask)
        for i, n in enumerate(lengths):
            alone = model(idx[i:i + 1, :n])[0]
            assert_close(out[i, :n], alone)
            assert_close(out_other[i, :n], alone)


# --- dropout ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["decoder", "encoder", "vit"])
def test_dropout_is_inactive_in_eval(kind):
    extra = dict(max_seq_len=17) if kind == "vit" else {}
    noisy = make(small(kind=kind, variant="Q-K=V", dropout=0.5, attn_dropout=0.5, **extra), seed=13)
    clean = make(small(kind=kind, variant="Q-K=V", **extra), seed=14)
    clean.load_state_dict(noisy.state_dict())
    x = torch.randn(2, 1, 28, 28) if kind == "vit" else torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        a, b = noisy(x), noisy(x)
        assert_close(a, clean(x))
        assert torch.equal(a, b)
        noisy.train()
        torch.manual_seed(0)
        assert (noisy(x) - a).abs().max() > 1e-3  # dropout does act in training


# --- embeddings ------------------------------------------------------------------------------
def test_tied_embeddings_share_storage():
    model = build_model(small(tie_embeddings=True))
    assert model.lm_head.weight is model.tok_emb.weight
    idx = torch.arange(4)[None]  # tokens 0..3; token 10 is not an input
    with torch.no_grad():
        before = model(idx)
        model.tok_emb.weight[10] += torch.randn(model.config.d_model)  # only the head can see this row
        moved = (model(idx) - before).abs()
    assert moved[..., 10].min() > 1e-3 and moved[..., :10].max() == 0 and moved[..., 11:].max() == 0
    untied = build_model(small(tie_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    config = small()
    assert _n_params(untied) - _n_params(model) == config.vocab_size * config.d_model


# --- parameter counts ----------------------------------------------------------------------
def _projection_params(config, which: str) -> int:
    """Weights and bias of one projection of one layer."""
    width = config.n_heads * config.resolved_head_dim if which == "q" else config.n_kv_heads * config.resolved_head_dim
    return config.d_model * width + (width if config.bias else 0)


def _pair_bias_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "pair_bias" in n)


@pytest.mark.parametrize("variant", variant_grid())
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_parameter_count_drops_by_exactly_the_removed_projections(variant, bias, kind):
    config = small(kind=kind, variant=variant, bias=bias, n_layers=3)
    spec = config.spec
    # the same head sharing with all three projections and no "+" bias
    baseline = config.replace(variant="QKV/MQA" if spec.kv_heads == 1 else
                              f"QKV/GQA-{spec.kv_heads}" if spec.kv_heads else "QKV")
    model, base = build_model(config), build_model(baseline)
    removed = [p for p in ("q", "k", "v") if p not in spec.projections]
    expected = config.n_layers * sum(_projection_params(config, p) for p in removed)
    assert _n_params(base) - (_n_params(model) - _pair_bias_params(model)) == expected
    if spec.pair_bias:
        assert _pair_bias_params(model) == config.n_layers * (model.backbone.blocks[0].attn.pair_bias.dim + 1)
    for block in model.backbone.blocks:
        attn = block.attn
        assert attn.qkv.out_features == sum(attn.widths.values())
        assert [p for p, w in attn.widths.items() if w] == list(spec.projections)


def test_qkv_minus_tied_kv_is_one_key_value_projection_per_layer():
    config = small(variant="Q-K=V")
    D, H_kv = config.resolved_head_dim, config.n_kv_heads
    diff = _n_params(build_model(config.replace(variant="QKV"))) - _n_params(build_model(config))
    assert diff == config.n_layers * (config.d_model * H_kv * D + H_kv * D)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_head_sharing_removes_key_and_value_heads(kv_heads):
    config = small(variant="QKV")
    shared = config.replace(variant="MQA" if kv_heads == 1 else f"GQA-{kv_heads}")
    D = config.resolved_head_dim
    removed = 2 * (config.n_heads - kv_heads) * D * (config.d_model + 1)
    assert _n_params(build_model(config)) - _n_params(build_model(shared)) == config.n_layers * removed
