"""Compiled decoding (`StaticDecoder` through torch.compile) generates what eager `generate` does."""

from __future__ import annotations

import json

import pytest

from qkvlab.cli.main import main
from qkvlab.deploy.compiled import CompiledDecoder
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
