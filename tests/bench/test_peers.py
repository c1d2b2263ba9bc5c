"""`qkvlab bench` on tiny shapes: end to end with the Hugging Face peers, like-for-like peers, errors."""

from __future__ import annotations

import json

import pytest
import torch

from qkvlab.arch import ModelConfig
from qkvlab.bench import peers as bench
from qkvlab.bench.roofline import PeakMemory, training_gemms
from qkvlab.cli.main import main
from qkvlab.cost import macs, param_counts

pytest.importorskip("transformers")

TINY = dict(layers=1, d_model=32, heads=4, vocab=64, d_mlp=48, train_batch=2, train_len=8, prefill_len=8,
            contexts=(8, 12), batches=(1, 2), repeats=1, bandwidth_mib=1)
TINY_ARGS = ["--layers", "1", "--d-model", "32", "--heads", "4", "--vocab", "64", "--d-mlp", "48", "--train-batch", "2",
             "--train-len", "8", "--prefill-len", "8", "--contexts", "8", "12", "--batches", "1", "2", "--repeats", "1",
             "--bandwidth-mib", "1"]
HF = {"gpt2": "HF GPT2LMHeadModel", "llama": "HF LlamaForCausalLM"}


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_runs_end_to_end_and_writes_json(tmp_path, capsys):
    path = tmp_path / "peers.json"
    code, out, err = run_cli(["bench", *TINY_ARGS, "--peers", "hf", "--json", str(path)], capsys)
    assert code == 0, err
    data = json.loads(path.read_text())
    assert set(data) == {"settings", "machine", "peers", "bandwidth", "compute", "shapes"}
    assert data["peers"]["hf"]["available"] and data["bandwidth"]["read_bytes_per_s"] > 0
    assert data["compute"]["flops_per_s"] > 0
    assert [s["shape"] for s in data["shapes"]] == ["gpt2", "llama"]
    for shape in data["shapes"]:
        names = [m["model"] for m in shape["models"]]
        assert names == list(bench.SHAPES[shape["shape"]][0]) + [HF[shape["shape"]]]
        peer = "vs " + HF[shape["shape"]]
        assert len(shape["train"]) == 3 and len(shape["prefill"]) == 3 * 2 and len(shape["decode"]) == 3 * 2 * 2
        for row in shape["train"]:
            assert row["tokens_per_s"] > 0 and row["flops_per_step"] > 0 and row["pct_matmul_peak"] > 0
            assert (peer in row) == (row["kind"] == "ours")
        for row in shape["decode"]:
            assert row["seconds"] > 0 and row["pct_memory_bound"] > 0 and row["bytes_moved"] > 0
            assert row["flops"] > 0 and row["pct_roofline"] >= row["pct_memory_bound"]
            assert (peer in row) == (row["kind"] == "ours")
            # the bound from the bandwidth x.sum() read in the cell's own rounds, shared by the cell's models
            assert row["bound_seconds"] == pytest.approx(row["bytes_moved"] / row["read_bytes_per_s"])
            same_cell = [r for r in shape["decode"] if (r["batch"], r["context"]) == (row["batch"], row["context"])]
            assert {r["read_bytes_per_s"] for r in same_cell} == {row["read_bytes_per_s"]}
        assert shape["matmul"]["flops_per_s"] > 0
        flops = {r["model"]: r["flops_per_step"] for r in shape["train"]}
        assert flops[names[0]] == flops[names[-1]] > flops[names[1]]  # the peer does our first variant's matmuls
    for part in ("% memory bound", "GB/s read", "% roofline", "% matmul peak", f"wrote {path}"):
        assert part in out


def test_hf_peers_are_our_models_like_for_like():
    """Same parameter count and the same logits: the HF peer holds our first variant's weights."""
    settings = bench.BenchSettings(**TINY)
    idx = torch.randint(0, 64, (2, 7))
    for shape in ("gpt2", "llama"):
        ours, tied, hf = bench.build_contenders(settings, shape, {"hf": True})
        assert hf.params() == ours.params() > 0
        assert hf.model.config._attn_implementation == "sdpa"
        with torch.no_grad():
            torch.testing.assert_close(hf.logits(idx), ours.logits(idx), rtol=1e-4, atol=1e-4)
        if shape == "gpt2":  # Q-K=V drops the value projection (weight and bias) of every layer
            assert ours.params() - tied.params() == settings.layers * (32 * 32 + 32)
        else:  # Q-GQA-2 drops the value projection of the 2 key/value heads of width 8 (no biases)
            assert ours.params() - tied.params() == settings.layers * 2 * 8 * 32


@pytest.mark.parametrize("shape", ["gpt2", "llama"])
def test_decode_steps_agree_with_the_full_forward(shape):
    """Each contender's timed step gives the full forward's logits at that position, every time (rewound)."""
    settings = bench.BenchSettings(**TINY)
    token = torch.tensor([[5], [9]])  # (B, 1)
    prefix = torch.cat(list(bench._chunks(2, 8, 64, torch.Generator().manual_seed(1), torch.device("cpu"))), dim=1)
    for c in bench.build_contenders(settings, shape, {"hf": True}):
        c.model.eval()
        with torch.inference_mode():
            cache = c.fill(2, 8, torch.Generator().manual_seed(1))  # the same tokens as `prefix`
            first, again = c.step(cache, token, 8), c.step(cache, token, 8)  # (B, 1, V)
            full = c.logits(torch.cat([prefix, token], dim=1))[:, -1:]  # (B, 1, V)
        torch.testing.assert_close(first, full, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(again, first)


def test_rotary_values_row_is_the_tied_model_with_values_turned():
    """--rotary-values adds Q-GQA-2 with rotary values to the llama shape only: the same weights as Q-GQA-2, another
    function, its timed decode step equal to its full forward; the speed-up columns compare it with the peers."""
    settings = bench.BenchSettings(**{**TINY, "rotary_values": True})
    assert [c.name for c in bench.build_contenders(settings, "gpt2", {})] == ["QKV", "Q-K=V"]
    contenders = bench.build_contenders(settings, "llama", {"hf": True})
    assert [c.name for c in contenders] == ["GQA-2", "Q-GQA-2", "Q-GQA-2 (rotary values)", HF["llama"]]
    tied, rv = contenders[1], contenders[2]
    assert rv.kind == "ours" and rv.config.rotary_values and not tied.config.rotary_values
    for name, t in tied.model.state_dict().items():
        assert torch.equal(rv.model.state_dict()[name], t), name
    idx = torch.randint(0, 64, (2, 9))
    token = idx[:, 8:]
    with torch.inference_mode():
        assert not torch.allclose(rv.logits(idx), tied.logits(idx), atol=1e-4)
        rv.model.eval()
        cache = rv.fill(2, 8, torch.Generator().manual_seed(1))
        prefix = torch.cat(list(bench._chunks(2, 8, 64, torch.Generator().manual_seed(1), torch.device("cpu"))), 1)
        torch.testing.assert_close(rv.step(cache, token, 8), rv.logits(torch.cat([prefix, token], 1))[:, -1:],
                                   rtol=1e-4, atol=1e-4)


def test_rotary_values_cli_times_the_extra_row(capsys):
    code, out, err = run_cli(["bench", *TINY_ARGS, "--peers", "hf", "--shapes", "llama", "--phases", "decode",
                              "--rotary-values"], capsys)
    assert code == 0, err
    assert "Q-GQA-2 (rotary values)" in out


def test_missing_peer_is_reported_not_raised(monkeypatch, capsys):
    monkeypatch.setattr(bench, "peer_status", lambda peer: (False, "import transformers failed (test)"))
    settings = bench.BenchSettings(**{**TINY, "shapes": ("gpt2",), "phases": ("prefill",), "batches": (1,)})
    report = bench.run(settings)
    out = capsys.readouterr().out
    assert "peer hf: unavailable, import transformers failed (test); benchmarking the rest" in out
    assert report.peers["hf"] == {"available": False, "reason": "import transformers failed (test)"}
    assert [r["model"] for r in report.shapes[0]["prefill"]] == ["QKV", "Q-K=V"]


def test_litgpt_status_is_one_line():
    ok, text = bench.peer_status("litgpt")
    assert "\n" not in text and text
    if not ok:
        assert text.startswith("import litgpt.model failed")


def test_each_library_s_own_loss_is_the_common_loss():
    """The "native" training loss of every contender (ours without the full logits, Hugging Face's `labels=`,
    litgpt's `chunked_cross_entropy` when importable) is cross-entropy on the contender's logits."""
    settings = bench.BenchSettings(**TINY)
    idx = torch.randint(0, 64, (2, 9))
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    available = {"hf": True, "litgpt": bench.peer_status("litgpt")[0]}
    for shape in ("gpt2", "llama"):
        contenders = bench.build_contenders(settings, shape, available)
        assert len(contenders) == 3 + available["litgpt"]
        for c in contenders:
            with torch.no_grad():
                common = torch.nn.functional.cross_entropy(c.logits(x).flatten(0, 1), y.flatten())
                assert c.loss(x, y).item() == pytest.approx(common.item(), rel=1e-5), c.name


def test_hf_loss_without_shift_labels_is_the_common_loss(monkeypatch):
    """Older transformers (no `shift_labels`): the Hugging Face peer's loss falls back to the common one."""
    monkeypatch.setattr(bench, "_takes_shift_labels", lambda: False)
    settings = bench.BenchSettings(**TINY)
    hf = bench.build_contenders(settings, "llama", {"hf": True})[-1]
    idx = torch.randint(0, 64, (2, 9))
    x, y = idx[:, :-1], idx[:, 1:]
    with torch.no_grad():
        assert hf.loss(x, y).item() == pytest.approx(bench.common_loss(hf, x, y).item())


def test_bad_train_loss_is_a_one_line_error(capsys):
    code, _, err = run_cli(["bench", "--train-loss", "fused"], capsys)
    assert code == 2 and "--train-loss must be one of native, common, got 'fused'" in err


@pytest.mark.parametrize("shape", ["gpt2", "llama"])
def test_litgpt_peer_when_importable(shape):
    """litgpt's GPT from our config: our parameter count (less the position table it lacks), and cached decode
    and prefill equal its full forward."""
    pytest.importorskip("litgpt.model")
    settings = bench.BenchSettings(**TINY)
    ours, _, lit = bench.build_contenders(settings, shape, {"litgpt": True})
    table = settings.max_seq_len * 32 if shape == "gpt2" else 0
    assert lit.params() == ours.params() - table
    token = torch.tensor([[5], [9]])  # (B, 1)
    prefix = torch.cat(list(bench._chunks(2, 8, 64, torch.Generator().manual_seed(1), torch.device("cpu"))), dim=1)
    lit.model.eval()
    with torch.inference_mode():
        lit.fill(2, 8, torch.Generator().manual_seed(1))
        first, again = lit.step(None, token, 8), lit.step(None, token, 8)  # (B, 1, V)
        prefill = lit.prefill(prefix)  # (B, V)
        lit.release(None)
        full = lit.logits(torch.cat([prefix, token], dim=1))  # (B, T + 1, V)
    torch.testing.assert_close(first, full[:, -1:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, first)
    torch.testing.assert_close(prefill, full[:, -2], rtol=1e-4, atol=1e-4)


def test_big_decode_cells_are_skipped(capsys):
    settings = bench.BenchSettings(**{**TINY, "shapes": ("gpt2",), "peers": (), "phases": ("decode",),
                                      "max_cache_gib": 1e-9})
    report = bench.run(settings)
    assert report.shapes[0]["decode"] == [] and len(report.shapes[0]["skipped"]) == 4
    assert "skipped, the caches need" in capsys.readouterr().out


def test_training_gemms_are_the_forward_macs():
    for shape, variant in (("gpt2", "QKV"), ("gpt2", "Q-K=V"), ("llama", "Q-GQA-2")):
        config = bench.BenchSettings(**TINY).config(shape, variant)
        forward = sum(g.flops * g.count for g in training_gemms(config, 16) if g.what.endswith("forward"))
        m = macs(config, None, 8, 2)
        assert forward == 2 * (m["qkv"] + m["out_proj"] + m["mlp"] + m["head"])


def test_peak_memory_sees_allocations_that_could_reuse_freed_memory():
    """Small blocks freed before the measured block stay in the allocator's free lists; the block's own small
    allocations must still count (they used to read 0: the later contenders of a benchmark reused the earlier
    ones' memory)."""
    freed = [torch.ones(16_000) for _ in range(2000)]  # 2,000 x 64 KB, under the mmap threshold: heap memory
    del freed
    with PeakMemory() as peak:
        kept = [torch.ones(16_000) for _ in range(1000)]  # 1,000 x 64 KB = 61 MiB
        del kept
    if not peak.method.startswith("VmHWM"):
        pytest.skip("measures growth of the process high-water mark here, not a reset one")
    assert peak.bytes >= 40 * 2 ** 20


def test_peak_memory_sees_an_allocation():
    with PeakMemory() as peak:
        x = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, touched: above glibc's largest mmap threshold, so fresh pages
        del x
    assert peak.bytes >= 48 * 2 ** 20 and peak.method


@pytest.mark.parametrize("argv, expect", [
    (["--contexts", "0"], "--contexts values must be positive integers, got 0"),
    (["--shapes", "bert"], "unknown shape 'bert'; accepted: gpt2, llama"),
    (["--peers", "vllm"], "unknown peer 'vllm'; accepted: hf, litgpt"),
    (["--heads", "5"], "--heads 5 does not divide --d-model 384"),
    (["--heads", "3", "--d-model", "384"], "--heads must be even"),
    (["--repeats", "-1"], "--repeats must be a positive integer, got -1"),
    (["--threads", "0"], "--threads must be a positive integer, got 0"),
    (["--max-cache-gib", "0"], "--max-cache-gib must be > 0"),
    (["--train-dtype", "fp16"], "--train-dtype must be one of float32, bfloat16, got 'fp16'"),
    (["--repeats", "x"], "invalid int value: 'x'"),
    (["--rotary-values", "--shapes", "gpt2"], "--rotary-values times rotary shapes (llama); --shapes gpt2 has none"),
])
def test_bad_values_are_one_line_errors(argv, expect, capsys):
    code, out, err = run_cli(["bench", *argv], capsys)
    assert code == 2 and out == ""
    assert expect in err and err.count("\n") == 1


def test_bfloat16_training_steps_run_under_autocast(tmp_path, capsys):
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(64, 16), torch.nn.Linear(16, 64)

        def forward(self, idx):
            out = self.head(self.emb(idx))
            seen.append(out.dtype)
            return out

    idx = torch.randint(0, 64, (2, 9))
    for dtype, expect in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model = Recorder()
        before = model.head.weight.detach().clone()
        bench._train_step(bench.Contender("m", model, None), idx, dtype, loss="common")()
        assert seen.pop() == expect and model.head.weight.dtype == torch.float32  # weights stay float32
        assert not torch.equal(model.head.weight, before)  # the step trained
    path = tmp_path / "bf16.json"
    code, out, err = run_cli(["bench", *TINY_ARGS, "--peers", "hf", "--phases", "train", "--shapes", "llama",
                              "--train-dtype", "bfloat16", "--json", str(path)], capsys)
    assert code == 0, err
    assert "bfloat16 autocast; torch.mm at these GEMMs (bfloat16)" in out
    data = json.loads(path.read_text())
    assert data["settings"]["train_dtype"] == "bfloat16" and len(data["shapes"][0]["train"]) == 3


def test_a_decode_step_reads_every_weight_but_the_tables_it_looks_rows_up_in():
    """Learned positions are looked up, never read whole; so is an untied token embedding (its LM head is read
    whole instead); a tied embedding is the LM head's weight and counts once."""
    tied = ModelConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=100, max_seq_len=32, positions="learned")
    untied = ModelConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=100, max_seq_len=32, positions="rotary",
                         tie_embeddings=False)
    t, u = param_counts(tied), param_counts(untied)
    assert bench.weight_bytes(tied) == 4 * (t["total"] - t["positions"])
    assert bench.weight_bytes(untied) == 4 * (u["total"] - u["embedding"])
    assert u["head"] == u["embedding"] > 0
    flops = bench.decode_flops(untied, batch=3, context=10)
    assert flops == 2 * macs(untied, seq_len=1, batch=3, past=10)["total"]
    assert bench.decode_flops(untied, batch=3, context=20) > flops  # the cache read grows with the context


def test_the_json_path_is_checked_before_measuring(tmp_path, capsys, monkeypatch):
    """An existing --json file is never overwritten unasked, nor a directory taken; both refused before any
    measuring (which takes minutes at the default sizes)."""
    measured = []
    monkeypatch.setattr(bench, "run", lambda settings: measured.append(settings))
    existing = tmp_path / "old.json"
    existing.write_text("{}\n")
    code, _, err = run_cli(["bench", *TINY_ARGS, "--json", str(existing)], capsys)
    assert code == 2 and "--json" in err and "--force" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["bench", *TINY_ARGS, "--json", str(tmp_path)], capsys)
    assert code == 2 and "is a directory" in err
    assert measured == [] and existing.read_text() == "{}\n"
