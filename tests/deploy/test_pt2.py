"""The torch.export programs generate what `qkvlab generate` does; their cache is the variant's bytes."""

from __future__ import annotations

import math

import pytest

from qkvlab.cost import cache_bytes
from qkvlab.deploy.pt2 import StaticDecoder, export_programs, export_pt2, generate_with
from qkvlab.errors import QkvlabError
from qkvlab.generate import SamplingConfig, generate
from qkvlab.models import ModelConfig, build_model
from tests.core.helpers import randomize_

CONTEXT = 40


def _model(variant: str, positions: str, **kw):
    config = ModelConfig(kind="decoder", variant=variant, n_layers=2, d_model=32, n_heads=4, max_seq_len=48,
                         vocab_size=40, positions=positions, **kw)
    return randomize_(build_model(config, seed=0)).eval()


@pytest.mark.parametrize("variant", ["QKV", "Q-K=V"])
def test_rotary_values_export_generates_the_same_tokens(variant):
    """Rotary values (keys and values stored rotated, outputs turned back) in the exported programs."""
    model = _model(variant, "rotary", rotary_values=True)
    decoder = StaticDecoder(model, CONTEXT)
    programs = export_programs(decoder)
    sampling = SamplingConfig(max_new_tokens=20, temperature=0)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    ours = generate_with(programs["prefill"].module(), programs["decode"].module(), decoder.empty_cache(), prompt,
                         sampling, CONTEXT, 40)
    assert ours == generate(model, [prompt], sampling)[0]


@pytest.mark.parametrize("variant", ["QKV", "Q-K=V", "Q-MQA"])
@pytest.mark.parametrize("positions", ["learned", "rotary"])
@pytest.mark.parametrize("cache_dtype", [None, "int8"])
def test_exported_programs_generate_the_same_tokens(variant, positions, cache_dtype):
    model = _model(variant, positions)
    decoder = StaticDecoder(model, CONTEXT, cache_dtype)
    programs = export_programs(decoder)
    sampling = SamplingConfig(max_new_tokens=24, temperature=0)
    for prompt in ([1, 2, 3, 4, 5, 6, 7], [9]):
        cache = decoder.empty_cache()
        ours = generate_with(programs["prefill"].module(), programs["decode"].module(), cache, prompt, sampling,
                             CONTEXT, 40)
        assert ours == generate(model, [prompt], sampling, cache_dtype=cache_dtype)[0]
    held = sum(t.numel() * t.element_size() for t in cache)
    assert held == cache_bytes(model.config, None, CONTEXT, 1, cache_dtype or "fp32")
    expected_names = ["kv"] if variant != "QKV" else ["k", "v"]
    if cache_dtype:
        expected_names = [n for name in expected_names for n in (name, name + "_scale")]
    assert [name for name, _, _ in decoder.cache_specs()] == expected_names
    assert math.prod(decoder.cache_specs()[0][1]) == 2 * (1 if variant == "Q-MQA" else 4) * CONTEXT * 8


def test_bad_export_requests_are_one_line_errors(tmp_path):
    model = _model("Q-K=V", "learned")
    with pytest.raises(QkvlabError, match="--max-context must be in 2..48"):
        StaticDecoder(model, 64)
    with pytest.raises(QkvlabError, match="export supports cache dtypes"):
        StaticDecoder(model, 16, "fp8")
    with pytest.raises(QkvlabError, match="must end in .pt2"):
        export_pt2(tmp_path, tmp_path / "model.bin")
    (tmp_path / "model.pt2").write_bytes(b"x")
    with pytest.raises(QkvlabError, match="existing file"):
        export_pt2(tmp_path / "run", tmp_path / "model.pt2")


@pytest.mark.slow
def test_aoti_package_generates_the_same_tokens(tmp_path):
    """AOTInductor compilation of both programs (about 1-3 minutes on 2 CPU cores)."""
    from qkvlab.deploy.pt2 import Pt2Runner
    from qkvlab.models.io import save_model

    model = _model("Q-MQA", "rotary")
    save_model(model, tmp_path / "run")
    info = export_pt2(tmp_path / "run", tmp_path / "model.pt2", CONTEXT, "int8")
    runner = Pt2Runner(tmp_path / "model.pt2")
    assert runner.cache_nbytes == info["cache_bytes"] == cache_bytes(model.config, None, CONTEXT, 1, "int8")
    sampling = SamplingConfig(max_new_tokens=20, temperature=0)
    prompt = [3, 1, 4, 1, 5]
    ours = generate_with(runner.prefill, runner.decode, runner.empty_cache(), prompt, sampling, CONTEXT, 40)
    assert ours == generate(model, [prompt], sampling, cache_dtype="int8")[0]
