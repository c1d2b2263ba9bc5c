"""`qkvlab variants`, `qkvlab cost`, `qkvlab cache`: tables, JSON, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qkvlab.arch import ModelConfig
from qkvlab.cost import ARCHS, STUDY_VARIANTS, cache_bytes, macs, param_counts
from qkvlab.models import PRESETS

ROOT = Path(__file__).resolve().parents[2]


# --- variants ------------------------------------------------------------------------------------------
def test_variants_table_lists_the_study(cli):
    code, out, err = cli("variants")
    assert code == 0 and not err
    names = [line.split()[0] for line in out.splitlines()[3:3 + len(STUDY_VARIANTS)]]
    assert names == list(STUDY_VARIANTS)
    assert "tied-kv" in out and "1/32" in out


def test_variants_json_ratios_for_16_heads(cli):
    code, out, _ = cli("variants", "--json")
    rows = {r["variant"]: r for r in json.loads(out)}
    assert code == 0 and list(rows) == list(STUDY_VARIANTS)
    assert {v: rows[v]["cache_vs_qkv"] for v in ("QKV", "Q-K=V", "GQA-4", "Q-GQA-4", "MQA", "Q-MQA")} == \
        {"QKV": "1", "Q-K=V": "1/2", "GQA-4": "1/4", "Q-GQA-4": "1/8", "MQA": "1/16", "Q-MQA": "1/32"}
    assert rows["Q=K-V"]["symmetric"] and not rows["Q=K-V+"]["symmetric"] and not rows["Q-K=V"]["symmetric"]
    assert rows["Q=K=V"]["projections"] == ["Wk"] and rows["QKV"]["cache_streams"] == 2
    assert rows["Q-K=V"]["aliases"] == ["tied-kv", "kv"]


def test_variants_aliases_parse_back(cli):
    from qkvlab.variants import parse_variant

    _, out, _ = cli("variants", "--json")
    for row in json.loads(out):
        for alias in row["aliases"]:
            assert parse_variant(alias).name == row["variant"], alias


def test_variants_one_by_alias(cli):
    code, out, _ = cli("variants", "tied-kv", "--json")
    row = json.loads(out)
    assert code == 0 and row["variant"] == "Q-K=V" and row["cache_vs_qkv"] == "1/2"
    code, out, _ = cli("variants", "Q-GQA-4")
    assert code == 0 and "1/8" in out and "16 query heads share 4 key/value head(s)" in out


def test_variants_heads_that_do_not_fit_are_na(cli):
    code, out, _ = cli("variants", "--heads", "12")
    assert code == 0
    assert "n/a (GQA-8 needs key/value heads dividing the 12 heads; 8 does not)" in out


# --- cost ----------------------------------------------------------------------------------------------
def test_cost_preset_json_equals_the_library(cli):
    code, out, _ = cli("cost", "--preset", "paper-300m", "--seq-len", "2048", "--json")
    data = json.loads(out)
    arch = PRESETS["paper-300m"]
    assert code == 0 and data["seq_len"] == 2048 and data["baseline"] == "QKV"
    assert [r["variant"] for r in data["variants"]] == list(STUDY_VARIANTS)
    for row in data["variants"]:
        assert row["params"] == param_counts(arch, row["variant"])
        assert row["macs"] == macs(arch, row["variant"], 2048, 1)
        assert row["cache_bytes"] == cache_bytes(arch, row["variant"], 2048, 1, "bf16")
    rel = {r["variant"]: r["relative_to_baseline"] for r in data["variants"]}
    assert rel["Q-K=V"]["cache"] == 0.5 and rel["Q-MQA"]["cache"] == 1 / 32 and rel["QKV"]["params"] == 1.0


def test_cost_table(cli):
    code, out, _ = cli("cost", "--preset", "paper-300m", "--seq-len", "2048", "--variants", "QKV,Q-K=V", "Q=K=V")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("paper-300m: decoder, 20 layers, d_model 1024")
    assert lines[1].split() == ["variant", "params", "Δ", "params", "MACs", "Δ", "MACs", "KV", "cache", "Δ", "cache"]
    qkv, kv = lines[3].split(), lines[4].split()
    assert qkv[0] == "QKV" and kv[0] == "Q-K=V" and lines[5].startswith("Q=K=V")
    assert kv[-2:] == ["-50.0", "%"] and "no causal halving" in out


def test_cost_named_arch_with_grouped_heads(cli):
    code, out, _ = cli("cost", "--arch", "llama-3-8b", "--seq-len", "4096", "--json")
    data = json.loads(out)
    rows = {r["variant"]: r for r in data["variants"]}
    assert code == 0 and data["baseline"] == "GQA-8"
    assert rows["QKV"]["params"]["total"] == 8_030_261_248 and rows["Q-K=V"]["as"] == "Q-GQA-8"
    assert not rows["Q=K-V"]["available"] and "ties Q to K" in rows["Q=K-V"]["reason"]
    code, out, _ = cli("cost", "--arch", "llama-3-8b", "--seq-len", "4096")
    assert code == 0 and "n/a (Q=K-V ties Q to K" in out


def test_cost_arch_overridden_by_flags(cli):
    code, out, _ = cli("cost", "--arch", "llama-3-8b", "--kv-heads", "32", "--seq-len", "16", "--json")
    data = json.loads(out)
    assert code == 0 and data["baseline"] == "QKV" and data["name"] == "llama-3-8b (modified)"
    assert all(r["available"] for r in data["variants"])


def test_cost_by_hand(cli):
    code, out, _ = cli("cost", "--layers", "2", "--d-model", "64", "--heads", "4", "--vocab", "100", "--mlp", "swiglu",
                       "--no-bias", "--no-tie-embeddings", "--positions", "rotary", "--seq-len", "8", "--json")
    data = json.loads(out)
    arch = ModelConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=100, max_seq_len=2048, mlp="swiglu", bias=False,
                       tie_embeddings=False, positions="rotary")
    assert code == 0 and ModelConfig(**data["arch"]) == arch and data["name"] == "custom"
    assert data["variants"][0]["params"] == param_counts(arch)


# --- cache ---------------------------------------------------------------------------------------------
CACHE_ARGS = ("cache", "--layers", "32", "--d-model", "4096", "--heads", "32", "--kv-heads", "8",
              "--context", "131072", "--batch", "1", "--dtype", "bf16")


def test_cache_grouped_baseline(cli):
    code, out, _ = cli(*CACHE_ARGS, "--json")
    data = json.loads(out)
    rows = {r["variant"]: r for r in data["variants"]}
    assert code == 0 and data["baseline"] == "GQA-8" and data["baseline_bytes"] == 16 * 2 ** 30
    assert rows["QKV"]["bytes"] == 16 * 2 ** 30 and rows["QKV"]["saving"] == 0
    assert rows["Q-K=V"]["bytes"] == 8 * 2 ** 30 and rows["Q-K=V"]["saving"] == 0.5
    assert rows["Q-MQA"]["vs_baseline"] == "1/16" and rows["MQA"]["vs_baseline"] == "1/8"
    assert [v for v, r in rows.items() if not r["available"]] == ["Q=K-V", "Q=K=V", "Q=K-V+", "Q=K=V+"]
    assert rows["Q-K=V"]["bytes"] == cache_bytes(ARCHS["llama-3-8b"], "Q-K=V", 131072, 1, "bf16")


def test_cache_table(cli):
    code, out, _ = cli(*CACHE_ARGS)
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("Q-K=V "))
    assert "Q-GQA-8" in row and "8.00 GiB" in row and "8,589,934,592" in row and "50.0 %" in row
    assert "n/a (Q=K-V ties Q to K, so it cannot share 8 key/value heads among 32 query heads" in out
    assert "Baseline: QKV as GQA-8" in out


def test_cost_notes_a_seq_len_beyond_the_model(cli):
    code, out, _ = cli("cost", "--arch", "llama-2-7b", "--seq-len", "8192", "--variants", "QKV")
    notes = [line for line in out.splitlines() if line.startswith("Note:")]
    assert code == 0 and notes == ["Note: --seq-len 8,192 exceeds llama-2-7b's max_seq_len 4,096; "
                                   "the counts are arithmetic only."]
    code, out, _ = cli("cost", "--arch", "llama-2-7b", "--seq-len", "4096", "--variants", "QKV")
    assert code == 0 and "Note:" not in out


def test_cost_and_cache_do_not_import_torch():
    script = (
        "import sys\n"
        "from qkvlab.cost import ARCHS, cache_bytes, macs, param_counts\n"
        "param_counts(ARCHS['paper-300m'], 'Q-K=V'); macs(ARCHS['gpt2'], 'Q-MQA', 128)\n"
        "cache_bytes(ARCHS['llama-3-8b'], 'Q-K=V', 4096)\n"
        "from qkvlab.cli.main import main\n"
        "assert main(['cost', '--preset', 'paper-300m']) == 0\n"
        "assert main(['cache', '--arch', 'llama-3-8b', '--json']) == 0\n"
        "print('torch' in sys.modules, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "False\n"


def test_cache_mha_baseline_and_note(cli):
    code, out, _ = cli("cache", "--arch", "llama-2-7b", "--context", "8192", "--variants", "QKV", "Q-K=V", "Q=K-V")
    assert code == 0 and "Baseline: QKV," in out and "n/a" not in out
    assert "exceeds llama-2-7b's max_seq_len 4,096" in out


# --- errors --------------------------------------------------------------------------------------------
BAD = [
    (["cache", "--layers", "2", "--d-model", "64", "--heads", "0"], "--heads must be a positive integer, got 0"),
    (["cache", "--layers", "2", "--d-model", "64", "--heads", "5"], "--heads=5 does not divide --d-model=64; accepted"),
    (["cache", "--layers", "2", "--d-model", "64", "--heads", "8", "--kv-heads", "3"],
     "--kv-heads=3 does not divide --heads=8"),
    (["cache", "--layers", "-2", "--d-model", "64", "--heads", "8"], "--layers must be a positive integer, got -2"),
    (["cache", "--arch", "gpt2", "--context", "-1"], "--context must be a positive integer, got -1"),
    (["cache", "--arch", "gpt2", "--batch", "0"], "--batch must be a positive integer, got 0"),
    (["cache", "--arch", "gpt2", "--dtype", "fp13"], "unknown dtype 'fp13'; accepted: fp64, fp32, bf16"),
    (["cache", "--arch", "gpt-5"], "unknown architecture 'gpt-5'; accepted: llama-3-8b"),
    (["cache", "--layers", "2"], "missing: --d-model, --heads"),
    (["cost", "--preset", "paper-9b"], "unknown preset 'paper-9b'; accepted: paper-300m, paper-1.2b"),
    (["cost", "--preset", "tiny", "--variants", "QKX"], "unknown variant 'QKX'; accepted: QKV"),
    (["cost", "--preset", "tiny", "--seq-len", "0"], "--seq-len must be a positive integer, got 0"),
    (["cost", "--preset", "tiny", "--batch", "-3"], "--batch must be a positive integer, got -3"),
    (["cost", "--arch", "gpt2", "--kv-heads", "0"], "--kv-heads must be a positive integer, got 0"),
    (["cost", "--arch", "gpt2", "--max-seq-len", "0"], "--max-seq-len must be a positive integer, got 0"),
    (["cost", "--arch", "gpt2", "--head-dim", "-8"], "--head-dim must be a positive integer or null, got -8"),
    (["cache", "--arch", "gpt2", "--vocab", "0"], "--vocab must be a positive integer, got 0"),
    (["cache", "--arch", "gpt2", "--context", "0"], "--context must be a positive integer, got 0"),
    (["variants", "Q=Q"], "unknown variant 'Q=Q'"),
    (["variants", "--heads", "0"], "--heads must be a positive integer, got 0"),
    (["cache", "--heads", "four"], "argument --heads: invalid int value: 'four'"),
    (["cost", "--preset", "tiny", "--arch", "gpt2"], "argument --arch: not allowed with argument --preset"),
    (["cost", "--mlp", "relu"], "argument --mlp: invalid choice: 'relu'"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2(cli, argv, message):
    code, out, err = cli(*argv)
    assert code == 2 and not out
    assert err.count("\n") == 1 and err.startswith("qkvlab") and "Traceback" not in err
    assert message in err


def test_subprocess_exit_code_and_one_line_stderr():
    argv = ["cache", "--heads", "0", "--layers", "32", "--d-model", "4096"]
    cmd = [sys.executable, "-m", "qkvlab", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == "qkvlab: error: --heads must be a positive integer, got 0\n"


# --- docs ----------------------------------------------------------------------------------------------
def _documented_runs() -> list[tuple[str, str]]:
    """(command, expected output) for every `$ qkvlab ...` line in docs/cost.md's code blocks."""
    runs, command, lines, in_block = [], None, [], False
    for line in (ROOT / "docs" / "cost.md").read_text().splitlines():
        if line.startswith("```"):
            in_block = not in_block
        if (line.startswith("$ qkvlab ") or line.startswith("```")) and command is not None:
            runs.append((command, "\n".join(lines)))
            command = None
        if in_block and line.startswith("$ qkvlab "):
            command, lines = line[len("$ qkvlab "):], []
        elif command is not None:
            lines.append(line)
    return runs


def test_docs_outputs_are_current(cli):
    runs = _documented_runs()
    assert len(runs) >= 6
    for command, expected in runs:
        code, out, err = cli(*command.split())
        assert (out + err).rstrip("\n") == expected, command
