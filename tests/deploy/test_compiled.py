"""Compiled decoding (`StaticDecoder` through torch.compile) generates what eager `generate` does."""

from __future__ import annotations

import json

import pytest
import torch

from qkvlab.cli.main import main
from qkvlab.deploy.compiled import CompiledDecoder, compile_options
from qkvlab.deploy.pt2 import StaticDecoder, generate_with
from qkvlab.errors import QkvlabError
from qkvlab.generate import SamplingConfig, generate
from qkvlab.models import ModelConfig, build_model
from qkvlab.models.io import save_model
from tests.core.helpers import randomize_


def _model(variant: str, positions: str, vocab: int = 40):
    config = ModelConfig(kind="decoder", variant=variant, n_layers=1, d_model=32, n_heads=4, max_seq_len=48,
                         vocab_size=vocab, positions=positions)
    return randomize_(build_model(config, seed=0)).eval()


@pytest.mark.slow
@pytest.mark.parametrize("variant, positions", [("QKV", "learned"), ("Q-K=V", "rotary")])
def test_compiled_decoding_generates_the_same_tokens(variant, positions):
    model = _model(variant, positions)
    prompts, sampling = [[1, 2, 3, 4, 5, 6, 7], [9]], SamplingConfig(max_new_tokens=16, temperature=0)
    assert CompiledDecoder(model, 24).generate(prompts, sampling) == generate(model, prompts, sampling)


@pytest.mark.slow
def test_generate_compile_on_the_command_line(tmp_path, capsys):
    path = save_model(_model("Q-K=V", "rotary", vocab=256), tmp_path / "model")  # bytes
    argv = ["generate", str(path), "--prompt", "ab", "--max-new-tokens", "6", "--temperature", "0", "--json"]
    assert main(argv) == 0
    eager = json.loads(capsys.readouterr().out)["outputs"]
    assert main([*argv, "--compile"]) == 0
    assert json.loads(capsys.readouterr().out)["outputs"] == eager


def test_compile_requests_that_cannot_run_are_one_line_errors(tmp_path, capsys):
    path = save_model(_model("Q-K=V", "rotary", vocab=256), tmp_path / "model")  # bytes
    base = ["generate", str(path), "--prompt", "ab", "--compile"]
    assert main([*base, "--fused-rotary"]) == 2
    assert "choose one" in capsys.readouterr().err
    assert main([*base, "--max-new-tokens", "60"]) == 2
    assert "exceeds the model's max_seq_len 48" in capsys.readouterr().err


def test_a_failing_compiler_is_one_clear_error(monkeypatch):
    decoder = CompiledDecoder(_model("QKV", "learned"), 8)

    def broken(*args):
        raise RuntimeError("InductorError: no working C++ compiler\ntraceback")

    monkeypatch.setattr(decoder, "step", broken)
    with pytest.raises(QkvlabError, match="compiled decoding needs torch.compile.*no working C\\+\\+ compiler"):
        decoder.generate([[1, 2]], SamplingConfig(max_new_tokens=2))


@pytest.mark.parametrize("variant, positions, cache_dtype", [("QKV", "learned", None), ("Q-K=V", "rotary", None),
                                                             ("Q-MQA", "rotary", "int8"), ("GQA-2", "rotary", None),
                                                             ("Q-K=V+", "rotary", None)])
def test_the_static_step_runs_where_its_model_is(variant, positions, cache_dtype):
    """Every tensor the step makes is on the model's device (what CUDA needs), checked on the "meta" device: a
    tensor made on the CPU next to meta ones is an error."""
    model = _model(variant, positions).to("meta")
    decoder = StaticDecoder(model, 16, cache_dtype)
    cache = decoder.empty_cache()
    assert {t.device.type for t in cache} == {"meta"}
    start = torch.zeros(1, dtype=torch.long, device="meta")
    with torch.no_grad():
        for tokens in (3, 1):  # prefill, decode
            logits = decoder(torch.zeros(1, tokens, dtype=torch.long, device="meta"), start, *cache)
            assert logits.shape == (1, 40) and logits.device.type == "meta"


def test_generation_feeds_the_step_on_the_caches_device():
    """`generate_with` makes its token and position tensors on the cache's device."""
    seen = []

    def step(idx, start, *cache):
        seen.append((idx.device.type, start.device.type))
        return torch.arange(40.0)[None]  # (1, V): always token 39

    cache = [torch.zeros(2, device="meta")]
    out = generate_with(step, step, cache, [1, 2, 3], SamplingConfig(max_new_tokens=3, temperature=0), 16, 40)
    assert out == [39, 39, 39] and seen == [("meta", "meta")] * 3


def test_cuda_steps_are_cuda_graphs_and_other_devices_are_refused():
    assert compile_options(torch.device("cuda", 0)) == {"mode": "reduce-overhead"}
    assert compile_options(torch.device("cpu")) == {}
    with pytest.raises(QkvlabError, match="compiled decoding runs on cpu or cuda, got a model on meta"):
        CompiledDecoder(_model("QKV", "learned").to("meta"), 8)


def test_one_cache_serves_every_prompt_zeroed():
    decoder = CompiledDecoder(_model("Q-K=V", "rotary"), 8)
    first = decoder.empty_cache()
    for t in first:
        t.fill_(1.0)
    again = decoder.empty_cache()
    assert all(a is b for a, b in zip(first, again, strict=True)) and all(t.abs().sum() == 0 for t in again)
