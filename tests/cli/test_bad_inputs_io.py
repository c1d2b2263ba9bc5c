"""Bad inputs at the CLI for convert, data, tokenize, generate, variants/cost/cache flags and
malformed files: each exits 2 with ONE line naming the bad value, no traceback, and no file of
the workspace changes (its tree is checksummed before and after). Then the data-loss cases:
the source survives `convert --out SRC` and `tokenize --out RUN`, pair-bias conversion is exact
tensor by tensor, a full disk during an atomic write leaves the previous file intact, a killed
tokenize leaves no temporary directory, and a damaged dataset is named with its repair command.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qkvlab import atomic
from qkvlab.cli.main import main
from qkvlab.convert import convert_variant
from qkvlab.data.cache import READY, file_manifest, require
from qkvlab.data.tokens import TokenWriter
from qkvlab.errors import QkvlabError
from qkvlab.generate import SamplingConfig, generate
from qkvlab.models import ModelConfig, build_model
from qkvlab.models.io import CONFIG_KEY, load_model, save_model

VOCAB = 128
CHARS = [chr(c) for c in range(32, 116)]  # 84 characters, like shakespeare-char padded to 128


def _tiny(variant: str = "QKV", kind: str = "decoder", **kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(kind=kind, variant=variant, n_layers=1, d_model=16, n_heads=2, max_seq_len=32,
                                   vocab_size=VOCAB, **kw)).eval()


def _gpt2_state(n_layer: int = 1, c: int = 8, vocab: int = 16, positions: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    state = {"wte.weight": r(vocab, c), "wpe.weight": r(positions, c), "ln_f.weight": r(c), "ln_f.bias": r(c)}
    for i in range(n_layer):
        for name, shape in (("ln_1", (c,)), ("ln_2", (c,)), ("attn.c_attn", (c, 3 * c)), ("attn.c_proj", (c, c)),
                            ("mlp.c_fc", (c, 4 * c)), ("mlp.c_proj", (4 * c, c))):
            state[f"h.{i}.{name}.weight"] = r(*shape)
            state[f"h.{i}.{name}.bias"] = r(shape[-1])
    return state


GPT2 = {"n_layer": 1, "n_embd": 8, "n_head": 2, "n_positions": 8, "vocab_size": 16}


def _gpt2_dir(path: Path, config=GPT2, state=None, raw_config: str | None = None, weights: bytes | None = None):
    path.mkdir()
    (path / "config.json").write_text(raw_config if raw_config is not None else json.dumps(config))
    if weights is not None:
        (path / "model.safetensors").write_bytes(weights)
    elif state is not False:
        save_file(state or _gpt2_state(), str(path / "model.safetensors"))


def _token_dir(path: Path, vocab, meta) -> None:
    path.mkdir()
    (path / "vocab.json").write_text(vocab if isinstance(vocab, str) else json.dumps(vocab))
    (path / "meta.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace of good and malformed inputs, shared by every bad-input case (which must not change it)."""
    d = tmp_path_factory.mktemp("ws")
    model = _tiny()
    save_model(model, d / "model")
    save_model(model, d / "run" / "checkpoints" / "step_1")
    save_model(_tiny(kind="encoder"), d / "enc")
    save_model(model, d / "ckpt_nomanifest")
    (d / "ckpt_nomanifest" / "manifest.json").unlink()
    (d / "ckpt_nomanifest" / "state.pt").write_bytes(b"state")
    save_model(model, d / "ckpt_bad")
    (d / "ckpt_bad" / "state.pt").write_bytes(b"state")
    (d / "ckpt_bad" / "manifest.json").write_text(json.dumps(
        {"format_version": 1, "files": {"model.safetensors": {"bytes": 1, "sha256": "0"},
                                        "state.pt": {"bytes": 5, "sha256": "0"}}}))
    (d / "garbage.safetensors").write_bytes(b"not safetensors at all")
    weights = (d / "model" / "model.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(weights[: len(weights) // 2])
    save_file({"a": torch.zeros(2)}, str(d / "nometa.safetensors"))
    save_file({"a": torch.zeros(2)}, str(d / "badmeta.safetensors"), metadata={CONFIG_KEY: "{not json"})
    save_file({"a": torch.zeros(2)}, str(d / "badfield.safetensors"), metadata={CONFIG_KEY: '{"bogus_field": 1}'})
    (d / "empty").mkdir()
    (d / "a.txt").write_text("hello world\n" * 20)
    (d / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")
    (d / "bad.jsonl").write_text("not json\n")
    (d / "list.jsonl").write_text("[1, 2]\n")
    (d / "notgzip.txt.gz").write_bytes(b"this is not gzip")
    (d / "corpus").mkdir()
    (d / "corpus" / "b.txt").write_text("text\n")
    (d / "tok_bad.json").write_text("{bad json")
    (d / "tok_list.json").write_text("[1, 2, 3]")
    _token_dir(d / "vocab_bad", "{bad", {"tokenizer": "char"})
    _token_dir(d / "vocab_ints", [1, 2, 3], {"tokenizer": "char"})
    _token_dir(d / "vocab_dup", ["a", "a"], {"tokenizer": "char"})
    _token_dir(d / "meta_list", ["a", "b"], "[]")
    _token_dir(d / "meta_eot", ["a", "b"], {"tokenizer": "char", "eot": 7})
    _token_dir(d / "chars", CHARS, {"tokenizer": "char", "eot": None})
    (d / "existing_out").mkdir()
    (d / "existing_out" / "keep.txt").write_text("precious\n")
    (d / "existing_file.bin").write_bytes(b"precious")
    _gpt2_dir(d / "gpt2_noweights", state=False)
    _gpt2_dir(d / "gpt2_badjson", raw_config="{")
    _gpt2_dir(d / "gpt2_latin1", raw_config="\xe9")
    (d / "gpt2_latin1" / "config.json").write_bytes(b'{"n_layer": "\xe9"}')
    _gpt2_dir(d / "gpt2_list", raw_config="[]")
    _gpt2_dir(d / "gpt2_strlayer", config={**GPT2, "n_layer": "two"})
    _gpt2_dir(d / "gpt2_boollayer", config={**GPT2, "n_layer": True})
    _gpt2_dir(d / "gpt2_neglayer", config={**GPT2, "n_layer": -1})
    _gpt2_dir(d / "gpt2_zerohead", config={**GPT2, "n_head": 0})
    _gpt2_dir(d / "gpt2_nopos", config={k: v for k, v in GPT2.items() if k != "n_positions"})
    _gpt2_dir(d / "gpt2_relu", config={**GPT2, "activation_function": "relu"})
    _gpt2_dir(d / "gpt2_eps", config={**GPT2, "layer_norm_epsilon": -1})
    _gpt2_dir(d / "gpt2_garbage", weights=b"garbage")
    _gpt2_dir(d / "gpt2_shape", config={**GPT2, "n_embd": 16})
    _gpt2_dir(d / "gpt2_vocab", config={**GPT2, "vocab_size": 99})
    _gpt2_dir(d / "gpt2_missing", state={k: v for k, v in _gpt2_state().items() if k != "ln_f.bias"})
    (d / "cache").mkdir()
    (d / "cwd").mkdir()
    return d


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under `root` (hidden ones too) with the sha256 of its content."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


M, R = "{d}/model", "{d}/run"
GEN = ["generate", M, "--prompt", "ab", "--max-new-tokens", "2", "--tokenizer", "{d}/chars"]
TOK = ["data", "tokenize", "--tokenizer", "bytes", "--out", "{d}/cwd/tok"]
CONV = ["convert", "--variant", "Q-K=V", "--out", "{d}/cwd/conv"]
CASES = [
    # top level, variants, cost, cache
    ("no-command", [], "required"),
    ("unknown-command", ["frobnicate"], "frobnicate"),
    ("variants-heads-0", ["variants", "--heads", "0"], "got 0"),
    ("variants-heads-neg", ["variants", "--heads", "-3"], "got -3"),
    ("variants-heads-float", ["variants", "--heads", "1.5"], "'1.5'"),
    ("variants-unknown", ["variants", "Q=Y"], "'Q=Y'"),
    ("variants-grouped-tied-q", ["variants", "Q=K=V/GQA-2"], "Q=K"),
    ("cost-seq-len-0", ["cost", "--seq-len", "0"], "got 0"),
    ("cost-seq-len-neg", ["cost", "--seq-len", "-5"], "got -5"),
    ("cost-preset", ["cost", "--preset", "nope"], "'nope'"),
    ("cost-arch", ["cost", "--arch", "nope"], "'nope'"),
    ("cache-layers-0", ["cache", "--layers", "0", "--d-model", "64", "--heads", "4", "--context", "10"], "got 0"),
    ("cache-context-neg", ["cache", "--layers", "2", "--d-model", "64", "--heads", "4", "--context", "-1"], "got -1"),
    ("cache-kv-heads", ["cache", "--layers", "2", "--d-model", "64", "--heads", "4", "--kv-heads", "3",
                        "--context", "10"], "--kv-heads=3"),
    ("cache-dtype", ["cache", "--layers", "2", "--d-model", "64", "--heads", "4", "--context", "10",
                     "--dtype", "fp7"], "'fp7'"),
    # convert: sources and outputs
    ("convert-unknown-variant", ["convert", M, "--variant", "Q=Y", "--out", "{d}/cwd/x"], "'Q=Y'"),
    ("convert-empty-variant", ["convert", M, "--variant", "", "--out", "{d}/cwd/x"], "''"),
    ("convert-grouped-q=k", ["convert", M, "--variant", "Q=K-V/GQA-2", "--out", "{d}/cwd/x"], "Q=K"),
    ("convert-bad-merge", ["convert", M, "--variant", "Q-K=V", "--merge", "max", "--out", "{d}/cwd/x"], "'max'"),
    ("convert-missing-src", ["convert", "{d}/nowhere", *CONV[1:]], "nowhere"),
    ("convert-empty-dir", ["convert", "{d}/empty", *CONV[1:]], "empty"),
    ("convert-garbage", ["convert", "{d}/garbage.safetensors", *CONV[1:]], "garbage.safetensors"),
    ("convert-truncated", ["convert", "{d}/truncated.safetensors", *CONV[1:]], "truncated.safetensors"),
    ("convert-no-metadata", ["convert", "{d}/nometa.safetensors", *CONV[1:]], "nometa.safetensors"),
    ("convert-bad-metadata", ["convert", "{d}/badmeta.safetensors", *CONV[1:]], "badmeta.safetensors"),
    ("convert-unknown-field", ["convert", "{d}/badfield.safetensors", *CONV[1:]], "badfield.safetensors"),
    ("convert-ckpt-no-manifest", ["convert", "{d}/ckpt_nomanifest", *CONV[1:]], "manifest.json is missing"),
    ("convert-ckpt-corrupt", ["convert", "{d}/ckpt_bad", *CONV[1:]], "ckpt_bad"),
    ("convert-out-is-src", ["convert", M, "--variant", "Q-K=V", "--out", M], "is the input"),
    ("convert-out-is-src-force", ["convert", M, "--variant", "Q-K=V", "--out", M, "--force"], "is the input"),
    ("convert-out-is-run", ["convert", R, "--variant", "Q-K=V", "--out", R, "--force"], "is the input"),
    ("convert-out-inside-src", ["convert", R, "--variant", "Q-K=V", "--out", R + "/converted", "--force"],
     "is inside the input"),
    ("convert-out-contains-src", ["convert", R + "/checkpoints/step_1", "--variant", "Q-K=V", "--out", R,
                                  "--force"], "contains the input"),
    ("convert-out-existing-dir", ["convert", M, "--variant", "Q-K=V", "--out", "{d}/existing_out"], "existing_out"),
    ("convert-out-existing-file", ["convert", M, "--variant", "Q-K=V", "--out", "{d}/existing_file.bin"],
     "existing_file.bin"),
    ("convert-out-existing-model", ["convert", M, "--variant", "Q-K=V", "--out", "{d}/enc"], "--force"),
    # convert --gpt2: malformed config.json and safetensors
    ("gpt2-not-a-dir", ["convert", "--gpt2", "{d}/a.txt", *CONV[1:]], "a.txt"),
    ("gpt2-no-weights", ["convert", "--gpt2", "{d}/gpt2_noweights", *CONV[1:]], "gpt2_noweights"),
    ("gpt2-bad-json", ["convert", "--gpt2", "{d}/gpt2_badjson", *CONV[1:]], "gpt2_badjson/config.json"),
    ("gpt2-not-utf8", ["convert", "--gpt2", "{d}/gpt2_latin1", *CONV[1:]], "gpt2_latin1/config.json"),
    ("gpt2-list", ["convert", "--gpt2", "{d}/gpt2_list", *CONV[1:]], "list"),
    ("gpt2-str-layer", ["convert", "--gpt2", "{d}/gpt2_strlayer", *CONV[1:]], "'two'"),
    ("gpt2-bool-layer", ["convert", "--gpt2", "{d}/gpt2_boollayer", *CONV[1:]], "True"),
    ("gpt2-neg-layer", ["convert", "--gpt2", "{d}/gpt2_neglayer", *CONV[1:]], "-1"),
    ("gpt2-zero-head", ["convert", "--gpt2", "{d}/gpt2_zerohead", *CONV[1:]], "'n_head'"),
    ("gpt2-no-positions", ["convert", "--gpt2", "{d}/gpt2_nopos", *CONV[1:]], "'n_positions'"),
    ("gpt2-relu", ["convert", "--gpt2", "{d}/gpt2_relu", *CONV[1:]], "'relu'"),
    ("gpt2-eps", ["convert", "--gpt2", "{d}/gpt2_eps", *CONV[1:]], "-1"),
    ("gpt2-garbage-weights", ["convert", "--gpt2", "{d}/gpt2_garbage", *CONV[1:]], "gpt2_garbage/model.safetensors"),
    ("gpt2-shape-mismatch", ["convert", "--gpt2", "{d}/gpt2_shape", *CONV[1:]], "shape"),
    ("gpt2-vocab-mismatch", ["convert", "--gpt2", "{d}/gpt2_vocab", *CONV[1:]], "tok_emb.weight"),
    ("gpt2-missing-tensor", ["convert", "--gpt2", "{d}/gpt2_missing", *CONV[1:]], "'ln_f.bias'"),
    ("gpt2-out-is-src", ["convert", "--gpt2", "{d}/gpt2_missing", "--variant", "QKV", "--out", "{d}/gpt2_missing",
                         "--force"], "is the input"),
    # data list / fetch
    ("fetch-unknown", ["data", "fetch", "nope", "--data-dir", "{d}/cache"], "'nope'"),
    ("fetch-user-dataset", ["data", "fetch", "cifar10", "--data-dir", "{d}/cache"], "'cifar10'"),
    ("fetch-no-name", ["data", "fetch"], "NAME"),
    ("data-no-subcommand", ["data"], "required"),
    # data tokenize: options, inputs, outputs, tokenizers
    ("tok-shard-0", [*TOK, "--shard-tokens", "0", "{d}/a.txt"], "got 0"),
    ("tok-shard-neg", [*TOK, "--shard-tokens", "-7", "{d}/a.txt"], "got -7"),
    ("tok-shard-tiny", [*TOK, "--shard-tokens", "5", "{d}/a.txt"], "got 5"),
    ("tok-shard-str", [*TOK, "--shard-tokens", "lots", "{d}/a.txt"], "'lots'"),
    ("tok-val-every-0", [*TOK, "--val-every", "0", "{d}/a.txt"], "got 0"),
    ("tok-val-every-neg", [*TOK, "--val-every", "-2", "{d}/a.txt"], "got -2"),
    ("tok-val-every-float", [*TOK, "--val-every", "0.5", "{d}/a.txt"], "'0.5'"),
    ("tok-missing-input", [*TOK, "{d}/missing.txt"], "missing.txt"),
    ("tok-directory-input", [*TOK, "{d}/corpus"], "corpus is a directory"),
    ("tok-missing-val", [*TOK, "{d}/a.txt", "--val", "{d}/nope.txt"], "nope.txt"),
    ("tok-directory-val", [*TOK, "{d}/a.txt", "--val", "{d}/corpus"], "corpus is a directory"),
    ("tok-not-utf8", [*TOK, "{d}/latin1.txt"], "latin1.txt is not UTF-8"),
    ("tok-bad-jsonl", [*TOK, "{d}/bad.jsonl"], "bad.jsonl:1"),
    ("tok-jsonl-list", [*TOK, "{d}/list.jsonl"], "list.jsonl:1"),
    ("tok-not-gzip", [*TOK, "{d}/notgzip.txt.gz"], "notgzip.txt.gz"),
    ("tok-out-existing-dir", ["data", "tokenize", "--tokenizer", "bytes", "--out", "{d}/existing_out", "{d}/a.txt"],
     "existing_out"),
    ("tok-out-existing-file", ["data", "tokenize", "--tokenizer", "bytes", "--out", "{d}/existing_file.bin",
                               "{d}/a.txt"], "existing_file.bin"),
    ("tok-out-is-run", ["data", "tokenize", "--tokenizer", "bytes", "--out", R, "{d}/a.txt"], "run"),
    ("tok-out-is-input", ["data", "tokenize", "--tokenizer", "bytes", "--out", "{d}/a.txt", "--force", "{d}/a.txt"],
     "is the input"),
    ("tok-out-contains-input", ["data", "tokenize", "--tokenizer", "bytes", "--out", "{d}/corpus", "--force",
                                "{d}/corpus/b.txt"], "contains the input"),
    ("tok-out-is-val", ["data", "tokenize", "--tokenizer", "bytes", "--out", "{d}/corpus/b.txt", "--force",
                        "{d}/a.txt", "--val", "{d}/corpus/b.txt"], "is the input"),
    ("tok-out-is-tokenizer", ["data", "tokenize", "--tokenizer", "{d}/chars", "--out", "{d}/chars", "--force",
                              "{d}/a.txt"], "is the input"),
    ("tok-unknown-tokenizer", ["data", "tokenize", "--tokenizer", "nope", "--out", "{d}/cwd/t", "{d}/a.txt"], "'nope'"),
    ("tok-missing-tokenizer-json", ["data", "tokenize", "--tokenizer", "{d}/none.json", "--out", "{d}/cwd/t",
                                    "{d}/a.txt"], "none.json"),
    ("tok-bad-tokenizer-json", ["data", "tokenize", "--tokenizer", "{d}/tok_bad.json", "--out", "{d}/cwd/t",
                                "{d}/a.txt"], "tok_bad.json"),
    ("tok-list-tokenizer-json", ["data", "tokenize", "--tokenizer", "{d}/tok_list.json", "--out", "{d}/cwd/t",
                                 "{d}/a.txt"], "tok_list.json"),
    ("tok-gpt2-not-fetched", ["data", "tokenize", "--tokenizer", "gpt2", "--data-dir", "{d}/cache", "--out",
                              "{d}/cwd/t", "{d}/a.txt"], "'gpt2'"),
    ("tok-no-files", ["data", "tokenize", "--tokenizer", "bytes", "--out", "{d}/cwd/t"], "FILE"),
    # generate: models
    ("gen-missing-model", ["generate", "{d}/nowhere", "--prompt", "a"], "nowhere"),
    ("gen-empty-dir", ["generate", "{d}/empty", "--prompt", "a"], "empty"),
    ("gen-garbage", ["generate", "{d}/garbage.safetensors", "--prompt", "a"], "garbage.safetensors"),
    ("gen-truncated", ["generate", "{d}/truncated.safetensors", "--prompt", "a"], "truncated.safetensors"),
    ("gen-no-metadata", ["generate", "{d}/nometa.safetensors", "--prompt", "a"], "nometa.safetensors"),
    ("gen-bad-metadata", ["generate", "{d}/badmeta.safetensors", "--prompt", "a"], "badmeta.safetensors"),
    ("gen-ckpt-no-manifest", ["generate", "{d}/ckpt_nomanifest", "--prompt", "a"], "manifest.json is missing"),
    ("gen-ckpt-corrupt", ["generate", "{d}/ckpt_bad", "--prompt", "a"], "ckpt_bad"),
    ("gen-encoder", ["generate", "{d}/enc", "--prompt", "a"], "encoder"),
    ("gen-no-prompt", ["generate", M], "--prompt"),
    ("gen-empty-prompt", [*GEN[:2], "--prompt", "", *GEN[4:]], "empty"),
    # generate: options
    ("gen-device-cpux", [*GEN, "--device", "cpux"], "'cpux'"),
    ("gen-device-empty", [*GEN, "--device", ""], "''"),
    ("gen-device-cuda", [*GEN, "--device", "cuda"], "'cuda'"),
    ("gen-device-cuda7", [*GEN, "--device", "cuda:7"], "'cuda:7'"),
    ("gen-max-new-neg", ["generate", M, "--prompt", "a", "--max-new-tokens", "-1"], "-1"),
    ("gen-max-new-huge", [*GEN, "--max-new-tokens", "1000000"], "1000000"),
    ("gen-max-new-str", ["generate", M, "--prompt", "a", "--max-new-tokens", "x"], "'x'"),
    ("gen-temperature-neg", [*GEN, "--temperature", "-1"], "-1"),
    ("gen-temperature-nan", [*GEN, "--temperature", "nan"], "nan"),
    ("gen-temperature-inf", [*GEN, "--temperature", "inf"], "inf"),
    ("gen-top-k-0", [*GEN, "--top-k", "0"], "got 0"),
    ("gen-top-k-neg", [*GEN, "--top-k", "-2"], "-2"),
    ("gen-top-p-0", [*GEN, "--top-p", "0"], "got 0"),
    ("gen-top-p-big", [*GEN, "--top-p", "1.5"], "1.5"),
    ("gen-top-p-nan", [*GEN, "--top-p", "nan"], "nan"),
    ("gen-stop-neg", [*GEN, "--stop", "-1"], "-1"),
    ("gen-stop-out-of-vocab", [*GEN, "--stop", "999999"], "999999"),
    ("gen-stop-float", [*GEN, "--stop", "1.5"], "'1.5'"),
    ("gen-prefill-0", [*GEN, "--prefill-chunk", "0"], "got 0"),
    ("gen-seed-neg", [*GEN, "--seed", "-1"], "-1"),
    # generate: tokenizers
    ("gen-unknown-tokenizer", [*GEN, "--tokenizer", "nope"], "'nope'"),
    ("gen-tokenizer-bad-json", [*GEN, "--tokenizer", "{d}/tok_bad.json"], "tok_bad.json"),
    ("gen-tokenizer-missing-json", [*GEN, "--tokenizer", "{d}/none.json"], "none.json"),
    ("gen-vocab-bad-json", [*GEN, "--tokenizer", "{d}/vocab_bad"], "vocab_bad/vocab.json"),
    ("gen-vocab-ints", [*GEN, "--tokenizer", "{d}/vocab_ints"], "vocab_ints/vocab.json"),
    ("gen-vocab-dup", [*GEN, "--tokenizer", "{d}/vocab_dup"], "vocab_dup/vocab.json"),
    ("gen-meta-list", [*GEN, "--tokenizer", "{d}/meta_list"], "meta_list/meta.json"),
    ("gen-meta-eot", [*GEN, "--tokenizer", "{d}/meta_eot"], "7"),
    ("gen-tokenizer-too-big", ["generate", M, "--prompt", "a", "--tokenizer", "bytes"], "256"),
    ("gen-prompt-outside-vocab", ["generate", M, "--prompt", "\u00e9t\u00e9", "--tokenizer", "{d}/chars"], "'é'"),
    ("gen-shakespeare-not-fetched", [*GEN, "--tokenizer", "shakespeare"], "shakespeare"),
]


@pytest.mark.parametrize("argv, expect", [pytest.param(a, e, id=i) for i, a, e in CASES])
def test_bad_input_is_one_line_and_changes_nothing(ws, argv, expect, capsys, monkeypatch):
    monkeypatch.chdir(ws / "cwd")
    monkeypatch.setenv("QKVLAB_DATA", str(ws / "cache"))
    before = tree_digest(ws)
    code, out, err = run_cli([a.format(d=ws) for a in argv], capsys)
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qkvlab") and ": error: " in lines[0], err
    assert expect.format(d=ws) in lines[0], lines[0]
    assert tree_digest(ws) == before


def test_enough_cases():
    assert len(CASES) >= 90 and len({c[0] for c in CASES}) == len(CASES)


def test_version(capsys):
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.startswith("qkvlab ") and out.count("\n") == 1


# ---- data loss: outputs --------------------------------------------------------------------

def test_convert_never_replaces_its_source_run(tmp_path, capsys):
    run = tmp_path / "run"
    save_model(_tiny(), run / "checkpoints" / "step_3")
    (run / "summary.json").write_text("{}")
    before = tree_digest(tmp_path)
    for argv in (["convert", str(run), "--variant", "Q-K=V", "--out", str(run)],
                 ["convert", str(run), "--variant", "Q-K=V", "--out", str(run), "--force"]):
        assert run_cli(argv, capsys)[0] == 2
    assert tree_digest(tmp_path) == before
    assert run_cli(["convert", str(run), "--variant", "Q-K=V", "--out", str(tmp_path / "new")], capsys)[0] == 0
    assert load_model(tmp_path / "new").config.variant == "Q-K=V"
    assert run_cli(["convert", str(run), "--variant", "MQA", "--out", str(tmp_path / "new")], capsys)[0] == 2
    assert run_cli(["convert", str(run), "--variant", "MQA", "--out", str(tmp_path / "new"), "--force"],
                   capsys)[0] == 0
    assert load_model(tmp_path / "new").config.variant == "MQA"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_tokenize_never_replaces_a_run_and_force_replaces_cleanly(tmp_path, capsys):
    run = tmp_path / "run"
    save_model(_tiny(), run / "checkpoints" / "step_3")
    (tmp_path / "a.txt").write_text("some text\n" * 10)
    before = tree_digest(run)
    code, _, err = run_cli(["data", "tokenize", "--tokenizer", "bytes", "--out", str(run), str(tmp_path / "a.txt")],
                           capsys)
    assert code == 2 and "--force" in err and tree_digest(run) == before
    out = tmp_path / "tok"
    argv = ["data", "tokenize", "--tokenizer", "bytes", "--out", str(out), str(tmp_path / "a.txt")]
    assert run_cli(argv, capsys)[0] == 0
    assert run_cli(argv, capsys)[0] == 2
    assert run_cli([*argv, "--force"], capsys)[0] == 0
    assert (out / "meta.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "run", "tok"]


def test_outputs_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic.atomic_write_text(tmp_path / "f.txt", "x")
        with atomic.atomic_dir(tmp_path / "d") as tmp:
            (tmp / "inner").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_a_killed_writers_temp_dir_is_swept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}-abc"
    stale.mkdir()
    with atomic.atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- data loss: a full disk ------------------------------------------------------------------

def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_enospc_during_an_atomic_write_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    atomic.atomic_write_text(target, "old\n")
    monkeypatch.setattr(atomic.os, "fsync", _no_space)
    with pytest.raises(QkvlabError) as info:
        atomic.atomic_write_text(target, "new\n")
    message = str(info.value)
    assert message == (f"could not write {target}: No space left on device; nothing was lost "
                       "(previous files are intact)")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_enospc_during_convert_keeps_the_previous_output(tmp_path, monkeypatch, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    save_model(_tiny(), src)
    save_model(_tiny("MQA"), out)
    before = tree_digest(tmp_path)
    monkeypatch.setattr("qkvlab.weights.save_file", _no_space)
    code, _, err = run_cli(["convert", str(src), "--variant", "Q-K=V", "--out", str(out), "--force"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"could not write {out}: No space left on device; nothing was lost" in err
    assert tree_digest(tmp_path) == before


@pytest.mark.slow
def test_file_size_limit_in_a_subprocess_is_one_line(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse the write (EFBIG) half-way through the weights file."""
    src, out = tmp_path / "src", tmp_path / "out"
    torch.manual_seed(0)
    model = build_model(ModelConfig(variant="QKV", n_layers=2, d_model=64, n_heads=2, max_seq_len=32, vocab_size=512))
    save_model(model, src)
    save_model(_tiny("MQA"), out)
    before = tree_digest(tmp_path)
    limit = (src / "model.safetensors").stat().st_size // 2

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "qkvlab", "convert", str(src), "--variant", "Q-K=V", "--out",
                           str(out), "--force"], capture_output=True, text=True, preexec_fn=cap, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"could not write {out}" in proc.stderr and "nothing was lost" in proc.stderr
    assert tree_digest(tmp_path) == before


def test_sigterm_during_tokenize_leaves_no_temp_dir(tmp_path):
    (tmp_path / "a.txt").write_text("text\n" * 100)
    out = tmp_path / "tok"
    script = ("import time, qkvlab.data.tokenize as t\n"
              "flush = t._flush\n"
              "def slow(*a):\n    flush(*a)\n    time.sleep(60)\n"
              "t._flush = slow\n"
              "from qkvlab.cli.main import main\n"
              f"raise SystemExit(main(['data', 'tokenize', '--tokenizer', 'bytes', '--out', {str(out)!r}, "
              f"{str(tmp_path / 'a.txt')!r}]))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".tok.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".tok.tmp-*")), "tokenize never started"
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    assert "interrupted" in proc.stderr.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


# ---- data loss: conversion carries every shared tensor ----------------------------------------

@pytest.mark.parametrize("source, target", [("QKV+", "Q-K=V+"), ("Q=K-V+", "Q=K=V+"), ("QKV+", "MQA+")])
def test_conversion_carries_the_pair_bias_tensor_by_tensor(source, target):
    model = _tiny(source)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # trained-looking weights, not the initial values
    new = convert_variant(model, target)
    old_state, new_state = model.state_dict(), new.state_dict()
    shared = [n for n in new_state if ".attn.qkv." not in n]
    assert any(".pair_bias." in n for n in shared)
    for name in shared:
        torch.testing.assert_close(new_state[name], old_state[name], rtol=0, atol=0, msg=name)


# ---- a damaged dataset ----------------------------------------------------------------------

def _fake_shakespeare(root: Path, manifest: bool) -> Path:
    path = root / "shakespeare"
    writer = TokenWriter(path, len(CHARS), "char")
    writer.write("train", list(range(len(CHARS))) * 4)
    writer.close()
    (path / "vocab.json").write_text(json.dumps(CHARS))
    ready = {"name": "shakespeare"} | ({"files": file_manifest(path)} if manifest else {})
    (path / READY).write_text(json.dumps(ready))
    return path


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "legacy"])
def test_a_truncated_shard_is_named_with_its_repair_command(tmp_path, manifest, capsys, monkeypatch):
    monkeypatch.delenv("QKVLAB_DATA", raising=False)
    path = _fake_shakespeare(tmp_path, manifest)
    assert require("shakespeare", tmp_path) == path
    shard = path / "train-000000.bin"
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(QkvlabError, match="train-000000.bin") as info:
        require("shakespeare", tmp_path)
    assert "qkvlab data fetch shakespeare --force" in str(info.value)
    code, out, _ = run_cli(["data", "list", "--data-dir", str(tmp_path)], capsys)
    row = next(line for line in out.splitlines() if line.startswith("shakespeare "))
    assert code == 1 and "DAMAGED" in row
    assert "train-000000.bin" in out and "qkvlab data fetch shakespeare --force" in out


# ---- generation: padded vocabularies and token ids --------------------------------------------

def test_generate_never_samples_ids_the_tokenizer_cannot_decode(ws, capsys):
    model = _tiny()
    with torch.no_grad():
        model.lm_head.weight[len(CHARS):] *= 50  # make the padding ids the likeliest
    ids = generate(model, [[1, 2], [3]], SamplingConfig(max_new_tokens=20, seed=0, vocab_limit=len(CHARS)))
    assert all(0 <= t < len(CHARS) for row in ids for t in row)
    path = ws / "cwd" / "padded"
    save_model(model, path)
    code, out, err = run_cli(["generate", str(path), "--prompt", "ab", "--tokenizer", str(ws / "chars"),
                              "--max-new-tokens", "20", "--seed", "0", "--json"], capsys)
    assert code == 0, err
    assert all(t < len(CHARS) for t in json.loads(out)["outputs"][0]["tokens"])


@pytest.mark.parametrize("prompts, expect", [
    ([[1.0, 2]], "1.0"), ([[True]], "True"), ([[VOCAB]], f"token id {VOCAB}"), ([[-1]], "token id -1"),
    ([1, 2, 3], "prompt 0"), ([], "non-empty"), ([[]], "prompt 0 is empty"), ("abc", "str"),
    (torch.ones(2, 2, 2, dtype=torch.long), "(2, 2, 2)"), ([torch.tensor([[1]])], "(1, 1)"),
    ([["a"]], "'a'"), (None, "NoneType"),
], ids=["float", "bool", "too-big", "negative", "flat", "empty", "empty-row", "string", "3d", "2d-row",
        "str-id", "none"])
def test_generate_names_bad_token_ids(prompts, expect):
    with pytest.raises(QkvlabError, match=None) as info:
        generate(_tiny(), prompts, SamplingConfig(max_new_tokens=1))
    assert expect in str(info.value)


@pytest.mark.parametrize("kwargs, expect", [
    ({"stop_tokens": (-1,)}, "-1"), ({"stop_tokens": (1.5,)}, "1.5"), ({"stop_tokens": "ab"}, "'ab'"),
    ({"max_new_tokens": 2.5}, "2.5"), ({"temperature": float("nan")}, "nan"), ({"seed": -1}, "-1"),
    ({"vocab_limit": 0}, "0"), ({"top_k": 1.5}, "1.5"),
])
def test_sampling_config_names_bad_values(kwargs, expect):
    with pytest.raises(QkvlabError) as info:
        SamplingConfig(**kwargs)
    assert expect in str(info.value)


def test_stop_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(QkvlabError, match=f"stop token {VOCAB} is outside"):
        generate(_tiny(), [[1]], SamplingConfig(max_new_tokens=1, stop_tokens=(VOCAB,)))
