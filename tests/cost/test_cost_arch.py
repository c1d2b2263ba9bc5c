"""Architecture validation (`ModelConfig`, as the calculator uses it), named architectures, variant resolution."""

from __future__ import annotations

import pytest

from qkvlab.arch import ModelConfig, with_kv_heads
from qkvlab.cost import ARCHS, describe, get_arch, param_counts, resolve_variant
from qkvlab.errors import QkvlabError
from qkvlab.models import PRESETS


@pytest.mark.parametrize("fields, message", [
    (dict(n_layers=0), "n_layers must be a positive integer, got 0"),
    (dict(d_model=-64), "d_model must be a positive integer, got -64"),
    (dict(n_heads=0), "n_heads must be a positive integer, got 0"),
    (dict(n_heads=5), "n_heads=5 does not divide d_model=64; accepted: 1, 2, 4, 8, 16, 32, 64"),
    (dict(variant="GQA-3"), "GQA-3 needs key/value heads dividing the 8 heads; 3 does not"),
    (dict(variant="GQA-16"), "GQA-16 needs key/value heads dividing the 8 heads"),
    (dict(head_dim=0), "head_dim must be a positive integer or null, got 0"),
    (dict(d_mlp=-5), "d_mlp must be a positive integer or null"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
    (dict(n_layers=True), "n_layers must be a positive integer, got True"),
    (dict(mlp="relu"), "mlp 'relu' is not one of gelu, swiglu"),
    (dict(norm="batchnorm"), "norm 'batchnorm' is not one of layernorm, rmsnorm"),
    (dict(positions="alibi"), "positions 'alibi' is not one of learned, sinusoidal, rotary, none"),
    (dict(kind="rnn"), "model kind 'rnn' is not one of decoder, encoder, vit"),
    (dict(positions="rotary", head_dim=3), "rotary positions need an even head_dim, got 3"),
    (dict(kind="vit", image_size=10, patch_size=3), "patch_size=3 does not divide image_size=10"),
    (dict(pair_bias_dim=12), "pair_bias_dim must be a multiple of 8, got 12"),
    (dict(d_model=63, n_heads=7, positions="sinusoidal"), "sinusoidal positions need an even d_model, got 63"),
])
def test_validation(fields, message):
    with pytest.raises(QkvlabError) as err:
        ModelConfig(**{**dict(n_layers=2, d_model=64, n_heads=8), **fields})
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kv_heads, message", [
    (3, "n_kv_heads=3 does not divide n_heads=8; accepted: 1, 2, 4, 8"),
    (16, "n_kv_heads=16 does not divide n_heads=8"),
    (-1, "n_kv_heads=-1 does not divide n_heads=8"),
])
def test_model_kv_heads_validation(kv_heads, message):
    with pytest.raises(QkvlabError, match=message):
        with_kv_heads("QKV", 8, kv_heads)


def test_head_dim_lets_heads_not_divide_d_model():
    arch = ModelConfig(n_layers=2, d_model=100, n_heads=3, head_dim=32)
    assert arch.resolved_head_dim == 32
    assert param_counts(arch, "Q-K=V")["attention"] == 2 * (100 * 2 * 96 + 2 * 96 + 96 * 100 + 100)
    with pytest.raises(QkvlabError, match=r"3 \* 32 != 100"):
        resolve_variant(arch, "Q=X")


def test_named_archs():
    llama = get_arch("Llama-3-8B")
    assert (llama.n_layers, llama.d_model, llama.n_heads, llama.n_kv_heads, llama.resolved_d_mlp) == \
        (32, 4096, 32, 8, 14336)
    assert (llama.vocab_size, llama.mlp, llama.norm, llama.bias, llama.tie_embeddings, llama.positions) == \
        (128256, "swiglu", "rmsnorm", False, False, "rotary")
    assert get_arch("tiny") == PRESETS["tiny"]  # any model preset
    assert set(ARCHS) >= {"llama-3-8b", "llama-2-7b", "mistral-7b", "gpt2", "gpt2-medium", "paper-300m", "paper-1.2b"}
    with pytest.raises(QkvlabError, match="unknown architecture 'llama-9'; accepted: llama-3-8b, "):
        get_arch("llama-9")


def test_describe_names_the_sizes_and_unknown_fields_are_refused():
    assert describe(ARCHS["llama-3-8b"], "llama-3-8b").startswith(
        "llama-3-8b: decoder, 32 layers, d_model 4096, 32 heads (8 kv heads), head_dim 128, d_mlp 14336 swiglu")
    assert describe(ARCHS["gpt2"]).startswith("custom: decoder, 12 layers")
    with pytest.raises(QkvlabError, match="unknown model config field"):
        ARCHS["gpt2"].replace(heads=4)


def test_with_variant_keeps_the_architecture():
    for name, cfg in PRESETS.items():
        assert cfg.with_variant(cfg.variant) is cfg, name
        tied = cfg.with_variant("Q-K=V")
        assert tied.variant == "Q-K=V" and tied.replace(variant=cfg.variant) == cfg, name
    llama = ARCHS["llama-3-8b"]
    assert llama.with_variant("Q-K=V").variant == "Q-GQA-8" and llama.with_variant("MQA").variant == "MQA"


def test_unknown_variant_lists_accepted():
    with pytest.raises(QkvlabError, match="unknown variant 'QKX'; accepted: QKV"):
        param_counts(ARCHS["gpt2"], "QKX")


def test_gqa_that_does_not_divide_is_refused():
    with pytest.raises(QkvlabError, match="GQA-8 needs key/value heads dividing the 12 heads"):
        resolve_variant(ARCHS["gpt2"], "GQA-8")
