"""Partial rotary through Hugging Face: our `qkvlab` export carries it; stock Llama only where it honours it."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM  # noqa: E402

import qkvlab.hf  # noqa: E402,F401  (registers the qkvlab model type)
from qkvlab.errors import QkvlabError  # noqa: E402
from qkvlab.generate import SamplingConfig, generate  # noqa: E402
from qkvlab.hf.export import export, to_llama  # noqa: E402
from qkvlab.interop.llama import (
    llama_config,  # noqa: E402
    llama_partial_rotary,  # noqa: E402
)
from qkvlab.models import ModelConfig, build_model  # noqa: E402


def tiny(variant: str, fraction: float, **kw):
    """A tiny rotary decoder (head_dim 8) with weights large enough for varied greedy tokens."""
    base = dict(kind="decoder", variant=variant, n_layers=2, d_model=32, n_heads=4, max_seq_len=48, vocab_size=40,
                positions="rotary", rotary_fraction=fraction)
    base.update(kw)
    model = build_model(ModelConfig(**base), seed=3)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


@pytest.mark.parametrize("variant", ["QKV", "Q-K=V", "Q-MQA"])
def test_qkvlab_export_round_trip(tmp_path, variant):
    model = tiny(variant, 0.5)
    export(model, tmp_path / "hf", "hf")
    saved = json.loads((tmp_path / "hf/config.json").read_text())
    assert saved["qkvlab"]["rotary_fraction"] == 0.5 and saved["partial_rotary_factor"] == 0.5
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.config.model_config.rotary_fraction == 0.5
    _same_logits_and_tokens(hf, model)


@pytest.mark.parametrize("variant", ["QKV", "Q-MQA"])
def test_rotary_values_export_round_trip(tmp_path, variant):
    """`rotary_values` (values turned by their positions) goes through the qkvlab export; stock Llama refuses it."""
    model = tiny(variant, 1.0, rotary_values=True)
    export(model, tmp_path / "hf", "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.config.model_config.rotary_values
    _same_logits_and_tokens(hf, model)
    with pytest.raises(QkvlabError, match="rotary_values=True"):
        export(tiny("QKV", 1.0, rotary_values=True, norm="rmsnorm", mlp="swiglu"), tmp_path / "llama", "llama")
    assert not (tmp_path / "llama").exists()


def _same_logits_and_tokens(hf, model) -> None:
    x = torch.tensor([[5, 9, 2, 31, 7, 11]])
    with torch.no_grad():
        assert torch.equal(hf(x, use_cache=False).logits, model(x))
    prompts = [[5, 9, 2, 31, 7], [3, 14]]
    ours = generate(model, prompts, SamplingConfig(max_new_tokens=8, temperature=0))
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out[:, longest:].tolist() == ours


def test_default_fraction_adds_no_hugging_face_field(tmp_path):
    export(tiny("QKV", 1.0), tmp_path / "hf", "hf")
    assert "partial_rotary_factor" not in json.loads((tmp_path / "hf/config.json").read_text())


def test_stock_llama_export_of_partial_rotary():
    model = tiny("GQA-2", 0.5, norm="rmsnorm", mlp="swiglu", bias=False)
    if not llama_partial_rotary():  # transformers' Llama ignores partial_rotary_factor (5.x): refused
        with pytest.raises(QkvlabError, match="cannot hold rotary_fraction=0.5: .* ignores partial_rotary_factor; "
                                              "use --format hf$"):
            to_llama(model)
        return
    hf = to_llama(model)  # a transformers whose Llama honours it: the same logits
    x = torch.randint(0, 40, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-5, rtol=0)


def test_llama_import_of_partial_rotary_factor():
    cfg = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 4, "vocab_size": 40, "rope_parameters": {"rope_type": "default",
                                                                           "rope_theta": 10000.0}}
    assert llama_config(cfg).rotary_fraction == 1.0
    cfg["rope_parameters"]["partial_rotary_factor"] = 0.5
    if llama_partial_rotary():
        assert llama_config(cfg).rotary_fraction == 0.5
    else:
        with pytest.raises(QkvlabError, match="partial_rotary_factor=0.5 is ambiguous"):
            llama_config(cfg)
    cfg["rope_parameters"]["partial_rotary_factor"] = 1.5
    with pytest.raises(QkvlabError, match="must be a number in"):
        llama_config(cfg)
