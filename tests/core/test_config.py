"""ModelConfig refuses bad sizes with QkvlabError; the paper presets carry the paper's numbers."""

from __future__ import annotations

import pytest
import torch

from qkvlab.errors import QkvlabError
from qkvlab.models import PRESETS, ModelConfig, build_model, preset

from .helpers import small

BAD = {
    "heads not dividing d_model": dict(d_model=64, n_heads=5),
    "heads not dividing d_model (GQA)": dict(d_model=30, n_heads=4, variant="GQA-2"),
    "zero layers": dict(n_layers=0),
    "negative layers": dict(n_layers=-2),
    "zero d_model": dict(d_model=0),
    "negative d_model": dict(d_model=-64),
    "zero heads": dict(n_heads=0),
    "negative heads": dict(n_heads=-8),
    "zero max_seq_len": dict(max_seq_len=0),
    "negative vocab": dict(vocab_size=-1),
    "zero classes": dict(n_classes=0),
    "zero head_dim": dict(head_dim=0),
    "negative d_mlp": dict(d_mlp=-4),
    "zero input_dim": dict(kind="encoder", input_dim=0),
    "zero pair_bias_dim": dict(pair_bias_dim=0),
    "float layers": dict(n_layers=2.5),
    "string heads": dict(n_heads="8"),
    "unknown kind": dict(kind="rnn"),
    "unknown variant": dict(variant="QQV"),
    "unknown positions": dict(positions="alibi"),
    "unknown norm": dict(norm="batchnorm"),
    "unknown mlp": dict(mlp="relu"),
    "dropout 1": dict(dropout=1.0),
    "negative dropout": dict(dropout=-0.1),
    "attn dropout 1": dict(attn_dropout=1.5),
    "kv heads not dividing heads": dict(variant="GQA-3"),
    "more kv heads than heads": dict(variant="Q-GQA-16"),
    "Q=K with kv heads": dict(variant="Q=K-V/GQA-2"),
    "Q=X narrow heads": dict(variant="Q=X", head_dim=4),
    "Q=X wide heads": dict(variant="Q=X", head_dim=16),
    "Q=X-K=V with head_dim": dict(variant="Q=X-K=V/MQA", d_model=60, head_dim=8),
    "rotary odd head_dim": dict(positions="rotary", d_model=56, n_heads=8),
    "rotary odd explicit head_dim": dict(positions="rotary", head_dim=7),
    "ViT patch not dividing image": dict(kind="vit", image_size=28, patch_size=5, max_seq_len=64),
    "ViT patches longer than context": dict(kind="vit", image_size=28, patch_size=4, max_seq_len=49),
}


@pytest.mark.parametrize("changes", list(BAD.values()), ids=list(BAD))
def test_bad_config_raises(changes):
    with pytest.raises(QkvlabError):
        small(**changes)


def test_sinusoidal_positions_with_odd_d_model_are_refused():
    # The sinusoidal table has an even number of columns: an odd d_model cannot be added to it.
    with pytest.raises(QkvlabError):
        small(positions="sinusoidal", d_model=33, n_heads=3)


@pytest.mark.parametrize("changes", [
    dict(d_model=60, n_heads=8, head_dim=8),  # explicit head_dim need not divide d_model
    dict(variant="Q=X", d_model=64, n_heads=4, head_dim=16),
    dict(variant="Q=X/GQA-2", positions="rotary"),
    dict(positions="rotary", d_model=48, n_heads=4),
    dict(kind="vit", image_size=28, patch_size=7, max_seq_len=17),
    dict(kind="encoder", input_dim=3, positions="none"),
    dict(variant="Q-MQA", n_heads=7, d_model=63),
])
def test_good_config_builds(changes):
    config = small(**changes)
    build_model(config)


def test_replace_validates_again_and_rejects_unknown_fields():
    config = small()
    assert config.replace(variant="tied-kv").variant == "Q-K=V"
    with pytest.raises(QkvlabError):
        config.replace(n_heads=5)
    with pytest.raises(QkvlabError):
        config.replace(n_head=4)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(QkvlabError, match="paper-300m"):
        preset("paper-3b")


def _gpt2_style(config: ModelConfig) -> None:
    assert config.kind == "decoder"
    assert config.positions == "learned"
    assert config.norm == "layernorm"
    assert config.mlp == "gelu"
    assert config.tie_embeddings and config.bias
    assert config.dropout == 0.1
    assert config.variant == "QKV"


def test_preset_300m_matches_the_paper():
    c = PRESETS["paper-300m"]
    _gpt2_style(c)
    assert (c.n_layers, c.d_model, c.n_heads, c.resolved_d_mlp, c.max_seq_len, c.vocab_size) == \
        (20, 1024, 16, 4096, 2048, 50304)
    assert c.resolved_head_dim == 64


def test_preset_1_2b_matches_the_paper():
    c = PRESETS["paper-1.2b"]
    _gpt2_style(c)
    assert (c.n_layers, c.d_model, c.n_heads, c.resolved_d_mlp, c.max_seq_len) == (22, 2048, 32, 8192, 2048)
    assert c.resolved_head_dim == 64


@pytest.mark.parametrize("name,low,high", [("paper-300m", 0.28e9, 0.33e9), ("paper-1.2b", 1.1e9, 1.3e9)])
def test_preset_sizes_are_what_the_names_say(name, low, high):
    with torch.device("meta"):
        model = build_model(preset(name))
    assert low < sum(p.numel() for p in model.parameters()) < high


def test_preset_overrides_change_only_what_is_given():
    base = preset("paper-300m")
    tied = preset("paper-300m", variant="Q-GQA-4")
    assert tied.variant == "Q-GQA-4" and tied.n_kv_heads == 4
    assert tied.replace(variant="QKV") == base
    assert preset("paper-1.2b", variant="Q-GQA-8").n_kv_heads == 8
    with pytest.raises(QkvlabError):
        preset("paper-300m", variant="GQA-3")
