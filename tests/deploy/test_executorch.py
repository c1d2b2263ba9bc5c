"""The ExecuTorch export (.pte) generates what `qkvlab generate` does; without executorch, a one-line error.

Lowering one tiny model to a .pte takes ~20-60 s on 2 shared CPU cores, hence `slow`; every test that
needs the `executorch` package skips when it is not installed (`pip install 'qkvlab[deploy]'`).
"""

from __future__ import annotations

import json
import sys

import pytest

from qkvlab.cli.main import main
from qkvlab.cost import cache_bytes
from qkvlab.generate import SamplingConfig, generate
from qkvlab.models import ModelConfig, build_model
from qkvlab.models.io import save_model
from tests.core.helpers import randomize_

CONTEXT = 40


def _model(variant: str, positions: str, vocab: int = 40):
    config = ModelConfig(kind="decoder", variant=variant, n_layers=2, d_model=32, n_heads=4, max_seq_len=48,
                         vocab_size=vocab, positions=positions)
    return randomize_(build_model(config, seed=0)).eval()


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _needs_executorch():
    pytest.importorskip("executorch.exir", reason="executorch is not installed (pip install 'qkvlab[deploy]')")


def test_without_executorch_the_format_is_a_one_line_error_naming_the_extra(tmp_path, capsys, monkeypatch):
    save_model(_model("Q-K=V", "learned"), tmp_path / "run")
    monkeypatch.setitem(sys.modules, "executorch", None)  # `import executorch...` now raises ImportError
    code, out, err = _cli(["export", tmp_path / "run", "--format", "executorch", "--out", tmp_path / "m.pte"], capsys)
    assert code == 2 and err.count("\n") == 1 and "qkvlab[deploy]" in err and "Traceback" not in err
    assert not (tmp_path / "m.pte").exists()
    (tmp_path / "x.pte").write_bytes(b"not a program")
    code, out, err = _cli(["generate", tmp_path / "x.pte", "--prompt", "a"], capsys)
    assert code == 2 and err.count("\n") == 1 and "qkvlab[deploy]" in err


def test_bad_requests_are_one_line_errors(tmp_path, capsys):
    _needs_executorch()
    save_model(_model("Q-K=V", "learned"), tmp_path / "run")
    cases = [
        (["export", tmp_path / "run", "--format", "executorch", "--out", tmp_path / "m.bin"], "must end in .pte"),
        (["export", tmp_path / "run", "--format", "executorch", "--out", tmp_path / "m.pte", "--max-context", "64"],
         "--max-context must be in 2..48"),
        (["export", tmp_path / "run", "--format", "executorch", "--out", tmp_path / "m.pte", "--cache-dtype", "fp8"],
         "export supports cache dtypes"),
        (["generate", tmp_path / "missing.pte", "--prompt", "a"], "is not a file"),
        (["generate", tmp_path / "junk.pte", "--prompt", "a"], "is not a qkvlab ExecuTorch export"),
        (["generate", tmp_path / "junk.pte", "--prompt", "a", "--cache-dtype", "int8"], "does not apply to a .pte"),
    ]
    (tmp_path / "junk.pte").write_bytes(b"\0" * 64)
    (tmp_path / "existing.pte").write_bytes(b"keep")
    cases.append((["export", tmp_path / "run", "--format", "executorch", "--out", tmp_path / "existing.pte"],
                  "existing file"))
    for argv, message in cases:
        code, out, err = _cli(argv, capsys)
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)
    assert (tmp_path / "existing.pte").read_bytes() == b"keep"
    assert not (tmp_path / "m.pte").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "positions", "cache_dtype"), [
    ("QKV", "learned", None), ("QKV", "rotary", "int8"),
    ("Q-K=V", "learned", "int8"), ("Q-K=V", "rotary", None),
    ("Q-MQA", "learned", None), ("Q-MQA", "rotary", "int8"),
])
def test_pte_generates_the_same_tokens(tmp_path, variant, positions, cache_dtype):
    _needs_executorch()
    from qkvlab.deploy.executorch import PteRunner, export_executorch

    model = _model(variant, positions)
    save_model(model, tmp_path / "run")
    info = export_executorch(tmp_path / "run", tmp_path / "model.pte", CONTEXT, cache_dtype)
    runner = PteRunner(tmp_path / "model.pte")
    assert runner.max_context == CONTEXT and runner.config["variant"] == model.config.variant
    assert runner.cache_nbytes == info["cache_bytes"] == cache_bytes(model.config, None, CONTEXT, 1,
                                                                     cache_dtype or "fp32")
    # the cache is the program's shared state: one extra memory arena of exactly those bytes in every method
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte = deserialize_pte_binary((tmp_path / "model.pte").read_bytes())
    plans = {plan.name: list(plan.non_const_buffer_sizes) for plan in getattr(pte, "program", pte).execution_plan}
    assert [plans[name][2] for name in ("reset", "prefill", "decode")] == [info["cache_bytes"]] * 3
    names = [name for name, _, _ in runner.specs]
    expected = ["kv"] if variant != "QKV" else ["k", "v"]
    assert names == ([n for name in expected for n in (name, name + "_scale")] if cache_dtype else expected)
    sampling = SamplingConfig(max_new_tokens=24, temperature=0)
    for prompt in ([1, 2, 3, 4, 5, 6, 7], [9], list(range(1, 17))):  # the cache is reset between sequences
        assert runner.generate(prompt, sampling) == generate(model, [prompt], sampling, cache_dtype=cache_dtype)[0]


@pytest.mark.slow
def test_cli_export_and_generate(tmp_path, capsys):
    _needs_executorch()
    save_model(_model("Q-MQA", "rotary", vocab=256), tmp_path / "run")
    out = tmp_path / "m.pte"
    code, stdout, err = _cli(["export", tmp_path / "run", "--format", "executorch", "--out", out,
                              "--max-context", 32, "--cache-dtype", "int8"], capsys)
    assert code == 0 and "wrote Q-MQA model" in stdout and "cache int8 of 640 bytes for 32 tokens" in stdout, err
    gen = ["--prompt", "hello", "--prompt", "ab", "--max-new-tokens", 12, "--temperature", 0, "--json"]
    code, stdout, err = _cli(["generate", out, *gen], capsys)
    assert code == 0, err
    ours = [row["tokens"] for row in json.loads(stdout)["outputs"]]
    code, stdout, err = _cli(["generate", tmp_path / "run", *gen, "--cache-dtype", "int8"], capsys)
    assert code == 0, err
    assert ours == [row["tokens"] for row in json.loads(stdout)["outputs"]]
    code, stdout, err = _cli(["export", tmp_path / "run", "--format", "executorch", "--out", out], capsys)
    assert code == 2 and "--force" in err and err.count("\n") == 1
