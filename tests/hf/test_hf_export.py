"""Hugging Face export: from_pretrained + generate equals qkvlab's generate for every variant, the
compact cache, stock GPT-2 / Llama round trips, tokenizers, CLI refusals."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import qkvlab.hf  # noqa: E402,F401  (registers the qkvlab model type)
from qkvlab.cli.main import main  # noqa: E402
from qkvlab.data.tokenizer import TextTokenizer, VocabTokenizer  # noqa: E402
from qkvlab.errors import QkvlabError  # noqa: E402
from qkvlab.generate import SamplingConfig, generate  # noqa: E402
from qkvlab.hf import QkvlabCache  # noqa: E402
from qkvlab.hf.export import export, to_gpt2, to_llama  # noqa: E402
from qkvlab.models import ModelConfig, build_model  # noqa: E402
from qkvlab.models.io import save_model  # noqa: E402

VARIANTS = ["QKV", "Q=K-V", "Q-K=V", "Q=K=V", "Q=X", "GQA-2", "Q-GQA-2"]


def tiny(variant="QKV", positions="learned", std=0.3, **kw):
    """A tiny decoder with weights large enough that greedy decoding does not repeat one token."""
    base = dict(kind="decoder", variant=variant, n_layers=2, d_model=32, n_heads=4, max_seq_len=48,
                vocab_size=40, positions=positions)
    base.update(kw)
    model = build_model(ModelConfig(**base), seed=3)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def hf_generate(hf, prompts, n):
    """Greedy HF generate on left-padded prompts; the new tokens of each row."""
    longest = max(map(len, prompts))
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                      return_dict_in_generate=True)
    cache = out.get("cache", out.get("past_key_values"))
    return out.sequences[:, longest:].tolist(), cache


@pytest.mark.parametrize("positions", ["learned", "rotary"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_generate_equals_qkvlab_generate(tmp_path, variant, positions):
    model = tiny(variant, positions)
    export(model, tmp_path / "hf", "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(hf).__name__ == "QkvlabForCausalLM" and hf.config.variant == model.config.variant
    prompts = [[5, 9, 2, 31, 7], [3, 14]]  # different lengths: left padding in HF, per-row lengths in qkvlab
    ours = generate(model, prompts, SamplingConfig(max_new_tokens=10, temperature=0))
    theirs, cache = hf_generate(hf, prompts, 10)
    assert theirs == ours
    assert len(set(ours[0])) > 1  # not a degenerate repetition
    assert isinstance(cache, QkvlabCache) and cache.streams == model.config.spec.cache_streams
    x = torch.tensor([prompts[0]])
    with torch.no_grad():
        assert torch.equal(hf(x, use_cache=False).logits, model(x))
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-5, rtol=0)  # through the cache


def test_hf_cache_bytes_half_for_k_equals_v(tmp_path):
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8]]
    sizes = {}
    for variant in ("QKV", "Q-K=V", "GQA-2", "Q-GQA-2"):
        export(tiny(variant), tmp_path / variant, "hf")
        _, cache = hf_generate(AutoModelForCausalLM.from_pretrained(tmp_path / variant), prompts, 6)
        sizes[variant] = cache.nbytes
    # 2 layers x 2 rows x 4 heads x (4 + 6 tokens) x 8 dims x 4 bytes, per stream
    assert sizes["QKV"] == 2 * (2 * 2 * 4 * 10 * 8 * 4)
    assert sizes["Q-K=V"] * 2 == sizes["QKV"]
    assert sizes["GQA-2"] * 2 == sizes["QKV"] and sizes["Q-GQA-2"] * 4 == sizes["QKV"]


def test_hf_trust_remote_code_and_tokenizer(tmp_path):
    model = tiny("Q=K=V", vocab_size=256)
    export(model, tmp_path / "hf", "hf", TextTokenizer("bytes"))
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "modeling_qkvlab.py", "configuration_qkvlab.py",
            "tokenizer.json"} <= files
    assert json.loads((tmp_path / "hf/config.json").read_text())["auto_map"]["AutoModelForCausalLM"] \
        == "modeling_qkvlab.QkvlabForCausalLM"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok("héllo")["input_ids"] == list("héllo".encode())
    x = torch.tensor([list(b"hello")])
    with torch.no_grad():
        assert torch.equal(hf(x, use_cache=False).logits, model(x))


def test_vocab_tokenizers_keep_their_ids(tmp_path):
    chars = VocabTokenizer("chars", list("abc \n"), words=False)
    words = VocabTokenizer("words", ["<unk>", "the", "cat", "<eos>"], words=True, eot=3, unknown="<unk>")
    for name, tok, text in (("c", chars, "ab c\na"), ("w", words, "the cat sat")):
        export(tiny(vocab_size=16), tmp_path / name, "hf", tok)
        hf_tok = AutoTokenizer.from_pretrained(tmp_path / name)
        assert hf_tok(text)["input_ids"] == tok.encode(text)
        assert hf_tok.decode(tok.encode(text)) == tok.decode(tok.encode(text))


@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_export_round_trip(tmp_path, tie):
    model = tiny("QKV", std=0.1, tie_embeddings=tie)
    export(model, tmp_path / "g", "gpt2")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "g")
    assert type(hf).__name__ == "GPT2LMHeadModel"
    x = torch.randint(0, 40, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-5, rtol=0)
    if hasattr(model.config, "activation"):  # exact GELU maps to GPT-2's "gelu"
        exact = tiny("QKV", std=0.1, activation="gelu")
        assert to_gpt2(exact).config.activation_function == "gelu"


@pytest.mark.parametrize("variant,bias,tie", [("QKV", False, False), ("GQA-2", False, True), ("MQA", True, False)])
def test_llama_export_round_trip(tmp_path, variant, bias, tie):
    model = tiny(variant, "rotary", std=0.1, norm="rmsnorm", mlp="swiglu", bias=bias, tie_embeddings=tie,
                 rope_theta=500.0)
    export(model, tmp_path / "l", "llama")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "l")
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.num_key_value_heads == model.config.n_kv_heads
    x = torch.randint(0, 40, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-5, rtol=0)
    ours = generate(model, [[4, 8, 15, 16]], SamplingConfig(max_new_tokens=8, temperature=0))
    assert hf.generate(torch.tensor([[4, 8, 15, 16]]), max_new_tokens=8, do_sample=False)[0, 4:].tolist() == ours[0]


def test_stock_formats_refuse_what_they_cannot_hold():
    with pytest.raises(QkvlabError, match="gpt2 cannot hold this model: variant='Q-K=V'"):
        to_gpt2(tiny("Q-K=V"))
    with pytest.raises(QkvlabError, match="positions='learned'"):
        to_llama(tiny("QKV"))
    with pytest.raises(QkvlabError, match="not Q-GQA-2"):
        to_llama(tiny("Q-GQA-2", "rotary", norm="rmsnorm", mlp="swiglu"))


def test_cli_export_refuses_existing_output(tmp_path, capsys):
    save_model(tiny("Q-K=V"), tmp_path / "m")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(tmp_path / "m"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err and (out / "keep.txt").exists()
    assert main(["export", str(tmp_path / "m"), "--format", "gpt2", "--out", str(tmp_path / "g")]) == 2
    assert "use --format hf" in capsys.readouterr().err and not (tmp_path / "g").exists()
    assert main(["export", str(tmp_path / "m"), "--out", str(out), "--force", "--tokenizer", "bytes"]) == 2
    assert "256 tokens but the model only 40" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "m"), "--out", str(out), "--force"]) == 0
    assert "Q-K=V model as QkvlabForCausalLM" in capsys.readouterr().out
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
