"""`qkvlab generate / convert / analyze` on saved models, and model save/load."""

import json

import pytest
import torch

from qkvlab.cli.main import main
from qkvlab.errors import QkvlabError
from qkvlab.models import ModelConfig, build_model
from qkvlab.models.io import load_model, save_model


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(variant="QKV", n_layers=2, d_model=32, n_heads=4, max_seq_len=64))
    return model.eval(), save_model(model, tmp_path / "model")


def test_save_load_round_trip_keeps_ties_and_outputs(saved, tmp_path):
    model, path = saved
    loaded = load_model(path)
    idx = torch.randint(0, 256, (2, 10))
    torch.testing.assert_close(loaded(idx), model(idx))
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    run = tmp_path / "run" / "checkpoints" / "step_7"
    run.parent.mkdir(parents=True)
    save_model(model, run)
    torch.testing.assert_close(load_model(tmp_path / "run")(idx), model(idx))


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(QkvlabError, match="no model at"):
        load_model(tmp_path)
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(QkvlabError, match="cannot read"):
        load_model(bad)


def test_generate_greedy_from_a_saved_model(saved, capsys):
    _, path = saved
    argv = ["generate", str(path), "--prompt", "ab", "--prompt", "hello", "--max-new-tokens", "5",
            "--temperature", "0", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert [len(o["tokens"]) for o in out["outputs"]] == [5, 5]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["outputs"] == out["outputs"]


def test_generate_with_the_fused_rotary_read_gives_the_same_tokens(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model(ModelConfig(variant="Q-K=V", n_layers=2, d_model=32, n_heads=4, max_seq_len=64,
                                    positions="rotary"))
    path = save_model(model, tmp_path / "model")
    argv = ["generate", str(path), "--prompt", "ab", "--prompt", "hello", "--max-new-tokens", "6",
            "--temperature", "0", "--json"]
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out)["outputs"]
    assert main([*argv, "--fused-rotary"]) == 0
    assert json.loads(capsys.readouterr().out)["outputs"] == plain


def test_generate_with_an_int8_cache_reads_it_in_one_pass_unless_told_not_to(saved, capsys, monkeypatch):
    """int8: the fused read by default, --no-fused-rotary the per-step dequantisation; the same tokens. Without
    a compiler the default falls back with a one-line note; asking for it is a one-line error (exit 2)."""
    from qkvlab.nn import kv_decode

    _, path = saved
    argv = ["generate", str(path), "--prompt", "ab", "--prompt", "hello", "--max-new-tokens", "6",
            "--temperature", "0", "--json", "--cache-dtype", "int8"]
    assert main([*argv, "--no-fused-rotary"]) == 0
    plain = json.loads(capsys.readouterr().out)["outputs"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["outputs"] == plain

    def no_compiler():
        raise QkvlabError("the fused rotary read's CPU kernel needs a C++ compiler (set CXX, or install g++)")

    monkeypatch.setattr(kv_decode, "library", no_compiler)
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["outputs"] == plain
    assert "note: int8 cache dequantised per step, slowly (the fused rotary read's CPU kernel needs" in captured.err
    assert main([*argv, "--fused-rotary"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("note:")]
    assert errors == ["qkvlab: error: the fused rotary read's CPU kernel needs a C++ compiler (set CXX, or "
                      "install g++)"]


def test_convert_writes_the_target_variant(saved, tmp_path, capsys):
    _, path = saved
    assert main(["convert", str(path), "--variant", "tied-kv", "--out", str(tmp_path / "kv")]) == 0
    assert "Q-K=V" in capsys.readouterr().out
    converted = load_model(tmp_path / "kv")
    assert converted.config.variant == "Q-K=V"
    assert converted.make_cache(1).nbytes * 2 == load_model(path).make_cache(1).nbytes


def test_convert_bad_variant_exits_2_and_writes_nothing(saved, tmp_path, capsys):
    _, path = saved
    assert main(["convert", str(path), "--variant", "Q=Y", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkvlab: error: unknown variant 'Q=Y'") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_convert_rotary_values(tmp_path, capsys):
    """--rotary-values: the saved model has them, its weights are the converted ones, and it decodes with its
    cache as its full forward does."""
    from qkvlab.convert import convert_variant

    torch.manual_seed(0)
    source = build_model(ModelConfig(variant="QKV", positions="rotary", n_layers=2, d_model=32, n_heads=4,
                                     max_seq_len=64)).eval()
    src = save_model(source, tmp_path / "rotary")
    assert main(["convert", str(src), "--variant", "Q-MQA", "--rotary-values", "--out", str(tmp_path / "rv")]) == 0
    assert "Q-MQA model with rotary values" in capsys.readouterr().out
    got = load_model(tmp_path / "rv").eval()
    assert got.config.rotary_values and got.config.variant == "Q-MQA"
    for name, t in convert_variant(source, "Q-MQA").state_dict().items():
        assert torch.equal(got.state_dict()[name], t), name
    idx = torch.randint(0, 256, (1, 9))
    cache = got.make_cache(1)
    with torch.no_grad():
        got(idx[:, :8], cache=cache)
        torch.testing.assert_close(got(idx[:, 8:], cache=cache)[:, -1], got(idx)[:, -1], atol=1e-5, rtol=1e-5)


def test_convert_rotary_values_needs_a_rotary_source(saved, tmp_path, capsys):
    _, path = saved  # learned positions
    assert main(["convert", str(path), "--variant", "Q-K=V", "--rotary-values", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--rotary-values needs a source with rotary positions" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_analyze_reports_every_layer(saved, capsys):
    _, path = saved
    assert main(["analyze", str(path), "--random-inputs", "--batch", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["layers"]
    assert [r["layer"] for r in rows] == [0, 1, "mean"]
    assert all(-1 <= r["cos_kv"] <= 1 for r in rows)
