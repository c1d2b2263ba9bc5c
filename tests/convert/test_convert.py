"""Checkpoint conversion: Hugging Face GPT-2 parity, exact untying, head pooling."""

import pytest
import torch

from qkvlab.convert import convert_variant, gpt2_from_state_dict, load_gpt2
from qkvlab.errors import QkvlabError
from qkvlab.models import ModelConfig, build_model

transformers = pytest.importorskip("transformers")


def _tiny(variant: str = "QKV", **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(variant=variant, n_layers=2, d_model=32, n_heads=4, max_seq_len=32, vocab_size=50, **kw)
    return build_model(cfg).eval()


IDX = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))


def _hf_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=50,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval(), cfg


def test_gpt2_import_matches_hugging_face_logits(tmp_path):
    hf, cfg = _hf_gpt2()
    hf.save_pretrained(tmp_path)  # config.json + model.safetensors, no network
    ours = load_gpt2(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDX), hf(IDX).logits, atol=1e-5, rtol=1e-5)


def test_gpt2_import_straight_into_q_k_v_runs():
    hf, cfg = _hf_gpt2()
    model = gpt2_from_state_dict(hf.state_dict(), cfg.to_dict(), variant="Q-K=V")
    assert model.config.variant == "Q-K=V"
    assert model(IDX).shape == (2, 12, 50)


def test_gpt2_directory_errors(tmp_path):
    with pytest.raises(QkvlabError, match="config.json"):
        load_gpt2(tmp_path)


@pytest.mark.parametrize("tied, untied", [("Q-K=V", "QKV"), ("Q=K=V", "QKV"), ("Q=K-V", "QKV"),
                                          ("Q=X", "QKV"), ("Q-GQA-2", "GQA-2"), ("MQA", "QKV")])
def test_untying_is_exact(tied, untied):
    model = _tiny(tied)
    with torch.no_grad():
        torch.testing.assert_close(convert_variant(model, untied)(IDX), model(IDX), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("target", ["Q-K=V", "GQA-2", "Q-GQA-2", "MQA", "Q-MQA", "Q=K=V"])
def test_tying_an_untied_copy_of_a_tied_model_round_trips(target):
    """A model that already satisfies the target's ties (built from it) survives QKV -> target exactly."""
    model = _tiny(target)
    untied = convert_variant(model, "QKV")
    with torch.no_grad():
        torch.testing.assert_close(convert_variant(untied, target)(IDX), model(IDX), atol=1e-5, rtol=1e-5)


def test_merge_choices_pick_keys_values_or_their_mean():
    model = _tiny("QKV")
    attn = model.backbone.blocks[0].attn
    d = attn.qkv.in_features
    w = attn.qkv.weight
    k, v = w[d:2 * d], w[2 * d:]
    for merge, expected in (("k", k), ("v", v), ("mean", (k + v) / 2)):
        tied = convert_variant(model, "Q-K=V", merge=merge).backbone.blocks[0].attn.qkv.weight
        torch.testing.assert_close(tied[d:], expected)
        torch.testing.assert_close(tied[:d], w[:d])
    with pytest.raises(QkvlabError, match="merge"):
        convert_variant(model, "Q-K=V", merge="max")


def test_gqa_pooling_averages_consecutive_heads():
    model = _tiny("QKV")
    attn = model.backbone.blocks[1].attn
    d, D = attn.qkv.in_features, attn.head_dim
    k = attn.qkv.weight[d:2 * d].reshape(4, D, d)  # (H, D, C)
    pooled = convert_variant(model, "GQA-2").backbone.blocks[1].attn.qkv.weight[d:d + 2 * D].reshape(2, D, d)
    torch.testing.assert_close(pooled, k.reshape(2, 2, D, d).mean(1))


def test_rotary_values_switch_keeps_the_weights_and_round_trips():
    """Switching rotary values on keeps every weight; the model computes another function (values turned), and
    switching off again gives back the source's logits exactly."""
    from qkvlab.convert import with_rotary_values

    model = _tiny("Q-K=V", positions="rotary")
    on = with_rotary_values(model)
    assert on.config.rotary_values and not model.config.rotary_values
    assert on.state_dict().keys() == model.state_dict().keys()
    for name, t in model.state_dict().items():
        assert torch.equal(on.state_dict()[name], t), name
    with torch.no_grad():
        assert not torch.allclose(on(IDX), model(IDX), atol=1e-3)  # the values now turn with their positions
        torch.testing.assert_close(with_rotary_values(on, False)(IDX), model(IDX), atol=0, rtol=0)
    assert with_rotary_values(on) is on  # already set: unchanged


@pytest.mark.parametrize("target", ["Q-K=V", "Q-MQA", "Q-GQA-2"])
def test_rotary_values_switch_commutes_with_conversion(target):
    """Tie then switch, or switch then tie: the same model (the switch touches no weight)."""
    from qkvlab.convert import with_rotary_values

    model = _tiny("QKV", positions="rotary")
    a = with_rotary_values(convert_variant(model, target))
    b = convert_variant(with_rotary_values(model), target)
    assert a.config == b.config and a.config.rotary_values
    with torch.no_grad():
        torch.testing.assert_close(a(IDX), b(IDX), atol=0, rtol=0)


def test_rotary_values_switch_needs_rotary_positions():
    from qkvlab.convert import with_rotary_values

    with pytest.raises(QkvlabError, match="positions='rotary'"):
        with_rotary_values(_tiny("Q-K=V"))
