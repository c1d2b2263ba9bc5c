"""Hugging Face Llama weights import into the modern decoder with logit parity (rotary pairs reordered),
cached decoding included, and then convert like any other model."""

import json

import pytest
import torch

from qkvlab.cli.main import main
from qkvlab.convert import convert_variant
from qkvlab.errors import QkvlabError
from qkvlab.generate import SamplingConfig, generate
from qkvlab.interop.llama import load_llama
from qkvlab.models.io import load_model

from .helpers import cached_logits

transformers = pytest.importorskip("transformers")

IDX = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
TOL = dict(atol=1e-5, rtol=1e-5)


def _hf_llama(path, kv_heads=2, tie=False, head_dim=None, theta=500000.0, same_kv=False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=50,
                                   max_position_embeddings=32, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                                   rope_parameters={"rope_type": "default", "rope_theta": theta},
                                   bos_token_id=0, eos_token_id=1, pad_token_id=0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():  # larger weights than HF's init, so that attention is peaked
            p.normal_(0, 0.3) if p.dim() == 2 else p.uniform_(0.5, 1.5)
        if same_kv:
            for layer in hf.model.layers:
                layer.self_attn.v_proj.weight.copy_(layer.self_attn.k_proj.weight)
    hf.save_pretrained(path)  # config.json + model.safetensors, no network
    return hf


@pytest.mark.parametrize("kw, variant", [(dict(), "GQA-2"), (dict(kv_heads=1, tie=True, head_dim=16), "MQA"),
                                         (dict(kv_heads=4, theta=10000.0), "QKV")])
def test_llama_import_matches_hugging_face(tmp_path, kw, variant):
    hf = _hf_llama(tmp_path, **kw)
    ours = load_llama(tmp_path)
    assert ours.config.variant == variant and ours.config.rope_theta == hf.config.rope_parameters["rope_theta"]
    with torch.no_grad():
        want = hf(IDX).logits
        torch.testing.assert_close(ours(IDX), want, **TOL)
        past = transformers.DynamicCache(config=hf.config)  # HF's own cached decoding agrees with ours
        steps = [hf(IDX[:, :5], cache=past, use_cache=True).logits]
        steps += [hf(IDX[:, t:t + 1], cache=past, use_cache=True).logits for t in range(5, 12)]
        torch.testing.assert_close(torch.cat(steps, 1), want, **TOL)
    torch.testing.assert_close(cached_logits(ours, IDX, (5,) + (1,) * 7), want, **TOL)


def test_greedy_generation_gives_the_same_tokens(tmp_path):
    hf = _hf_llama(tmp_path)
    ours = load_llama(tmp_path)
    prompt = IDX[:1, :4]
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                         eos_token_id=None)[0, 4:].tolist()
    mine = generate(ours, [prompt[0].tolist()], SamplingConfig(max_new_tokens=10, temperature=0))[0]
    assert mine == theirs


def test_equal_keys_and_values_convert_to_k_equals_v_losslessly(tmp_path):
    """The rotary reordering is applied to values too, so K = V survives the import and Q-GQA-2 is exact."""
    hf = _hf_llama(tmp_path, same_kv=True)
    model = load_llama(tmp_path, "Q-GQA-2")
    assert model.config.variant == "Q-GQA-2"
    with torch.no_grad():
        torch.testing.assert_close(model(IDX), hf(IDX).logits, **TOL)
    torch.testing.assert_close(cached_logits(model, IDX, (4, 1, 3, 1, 1, 1, 1)), hf(IDX).logits.detach(), **TOL)


def test_cli_llama_import_then_convert(tmp_path, capsys):
    _hf_llama(tmp_path / "hf")
    for flags, out in ((["--llama"], "a"), (["--from", "llama"], "b")):
        assert main(["convert", *flags, str(tmp_path / "hf"), "--variant", "Q-MQA", "--out", str(tmp_path / out)]) == 0
    want = convert_variant(load_llama(tmp_path / "hf"), "Q-MQA")
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "a")(IDX), want(IDX))
    assert "wrote Q-MQA model" in capsys.readouterr().out


def test_cli_llama_to_q_mqa_with_rotary_values(tmp_path, capsys):
    """A Llama directory straight to Q-MQA with rotary values: the imported, converted weights in a model that
    turns values by position, whose cached decoding equals its full forward."""
    from qkvlab.convert import with_rotary_values

    _hf_llama(tmp_path / "hf")
    assert main(["convert", "--llama", str(tmp_path / "hf"), "--variant", "Q-MQA", "--rotary-values",
                 "--out", str(tmp_path / "rv")]) == 0
    assert "wrote Q-MQA model with rotary values" in capsys.readouterr().out
    got = load_model(tmp_path / "rv")
    want = with_rotary_values(load_llama(tmp_path / "hf", "Q-MQA"))
    with torch.no_grad():
        full = got(IDX)
        torch.testing.assert_close(full, want(IDX), atol=0, rtol=0)
        assert not torch.allclose(full, load_llama(tmp_path / "hf", "Q-MQA")(IDX), atol=1e-3)
    torch.testing.assert_close(cached_logits(got, IDX, (5,) + (1,) * 7), full, **TOL)


def _edit(path, config=None, drop=None, reshape=None):
    from safetensors.torch import load_file, save_file

    if config is not None:
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(config)
        (path / "config.json").write_text(json.dumps(cfg))
    state = load_file(str(path / "model.safetensors"))
    if drop:
        state.pop(drop)
    if reshape:
        state[reshape] = torch.zeros(3, 32)
    save_file(state, str(path / "model.safetensors"))


@pytest.mark.parametrize("edit, message", [
    (dict(drop="model.layers.1.mlp.up_proj.weight"), r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"),
    (dict(reshape="model.layers.0.self_attn.k_proj.weight"),
     r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape"),
    (dict(config={"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}), "rope type 'llama3'"),
    (dict(config={"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}), "rope type 'yarn'"),
    (dict(config={"hidden_act": "gelu"}), "hidden_act 'gelu'"),
    (dict(config={"model_type": "mistral"}), "model_type 'mistral'"),
    (dict(config={"num_key_value_heads": 3}), "num_key_value_heads=3"),
    (dict(config={"attention_bias": True}), "attention_bias=True"),
])
def test_bad_llama_directories_are_one_line_errors(tmp_path, capsys, edit, message):
    _hf_llama(tmp_path / "hf")
    _edit(tmp_path / "hf", **edit)
    capsys.readouterr()  # save_pretrained's progress bar
    with pytest.raises(QkvlabError, match=message):
        load_llama(tmp_path / "hf")
    assert main(["convert", "--llama", str(tmp_path / "hf"), "--variant", "GQA-2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "hf" in err, err
    assert not (tmp_path / "o").exists()


def test_not_a_llama_directory(tmp_path):
    with pytest.raises(QkvlabError, match="config.json"):
        load_llama(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(QkvlabError, match="not valid JSON"):
        load_llama(tmp_path)


def test_sharded_safetensors(tmp_path):
    hf = _hf_llama(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        torch.testing.assert_close(load_llama(tmp_path / "sharded")(IDX), hf(IDX).logits, **TOL)
