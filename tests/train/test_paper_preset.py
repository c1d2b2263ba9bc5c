"""`qkvlab reproduce --preset paper`: every planned run resolves and builds (on the meta device, nothing
allocated), grad_accum keeps the global batch, GPU-hours match a hand computation, and the CLI prints
the plan, refuses to launch without CUDA and launches one torchrun after another with it."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from qkvlab.arch import PRESETS
from qkvlab.cli.main import main
from qkvlab.cost import param_counts
from qkvlab.data.tokens import TokenWriter
from qkvlab.errors import QkvlabError
from qkvlab.models import build_model
from qkvlab.train import paper
from qkvlab.train.config import find_config, load_config, resolve_run

ARCH = {"lm-300m": PRESETS["paper-300m"], "lm-1.2b": PRESETS["paper-1.2b"]}
RUNS = [(scale.config, variant) for scale in paper.SCALES.values() for variant in scale.variants]
MICRO = {"lm-300m": 8, "lm-1.2b": 4}  # sequences per GPU per micro-step, as the configs are written


@pytest.fixture(scope="module")
def plan() -> paper.PaperPlan:
    return paper.plan()


@pytest.fixture(autouse=True)
def no_cuda(monkeypatch):
    """Tests decide whether CUDA is present, whatever the machine has."""
    monkeypatch.setattr(paper, "cuda_devices", lambda: 0)


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def token_dir(path: Path, vocab: int = 50257, tokens: int = 5000) -> Path:
    writer = TokenWriter(path, vocab, "gpt2")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        writer.write(split, rng.integers(0, vocab, tokens))
    writer.close()
    return path


def test_the_runs_are_the_papers(plan):
    assert [(run.config_name, run.variant) for run in plan.runs] == RUNS
    assert ("lm-300m", "Q-K=V") in RUNS and ("lm-1.2b", "Q-GQA-8") in RUNS and len(RUNS) == 12


@pytest.mark.parametrize(("config", "variant"), RUNS, ids=[f"{c}-{v}" for c, v in RUNS])
def test_run_resolves_and_builds_on_meta(plan, config, variant):
    run = next(r for r in plan.runs if (r.config_name, r.variant) == (config, variant))
    cfg = run.resolved.config
    assert (cfg.task, cfg.variant, cfg.seed, cfg.data_dir) == ("tokens", variant, 0, paper.DATA_PLACEHOLDER)
    assert Path(cfg.train.out_dir).parts[:3] == ("runs", "reproduce-paper", config)
    assert run.resolved.model == ARCH[config].with_variant(variant)
    # the command line is the config: qkvlab train resolves it to the same run
    argv = shlex.split(run.command_line())
    assert argv[:7] == ["torchrun", "--nproc_per_node", "8", "-m", "qkvlab", "train", config]
    assert resolve_run(load_config(find_config(argv[6]), argv[7:])).config == cfg
    with torch.device("meta"):
        model = build_model(run.resolved.model, seed=0)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == param_counts(ARCH[config], variant)["total"] == run.params


@pytest.mark.parametrize(("gpus", "accum_300m", "accum_1b"),
                         [(1, 32, 128), (2, 16, 64), (4, 8, 32), (8, 4, 16), (16, 2, 8)])
def test_grad_accum_keeps_the_global_batch(gpus, accum_300m, accum_1b):
    expected = {"lm-300m": accum_300m, "lm-1.2b": accum_1b}
    for run in paper.plan(gpus=gpus).runs:
        train = run.resolved.config.train
        assert train.grad_accum == expected[run.config_name]
        assert train.batch_size == {"lm-300m": 256, "lm-1.2b": 512}[run.config_name]
        assert run.micro_batch == MICRO[run.config_name]
        assert gpus * run.micro_batch * train.grad_accum == train.batch_size
        assert f"--nproc_per_node {gpus} " in run.command_line()
        assert f"train.grad_accum={train.grad_accum}" in run.command_line()


def test_many_gpus_shrink_the_micro_batch():
    assert paper.grad_accum_for(256, 8, 64) == 1  # 4 sequences per GPU, one micro-step
    assert paper.grad_accum_for(512, 4, 256) == 1
    assert paper.grad_accum_for(24, 8, 2) == 2  # 12 per GPU: two micro-steps of 6, not 8 + 4


def test_gpu_counts_not_dividing_the_batch_are_refused():
    with pytest.raises(QkvlabError, match=r"^--gpus 3 does not divide the global batch of 256 sequences "
                                          r"\(lm-300m\); accepted: 1, 2, 4, 8, 16"):
        paper.plan(gpus=3)
    with pytest.raises(QkvlabError, match="--gpus must be at least 1, got 0"):
        paper.grad_accum_for(256, 8, 0)


def test_gpu_hours_match_a_hand_computation(plan):
    run = plan.runs[0]
    assert (run.config_name, run.variant) == ("lm-300m", "QKV")
    # 20 layers, d 1024, context 2048, vocabulary 50,304: per token and layer 3d² (q, k, v) + d² (out)
    # + 8d² (MLP) + 2·T·d (scores and weighted sum over the full T x T), then d·V for the head
    L, d, T, V = 20, 1024, 2048, 50304
    forward_per_sequence = T * (L * (12 * d * d + 2 * T * d) + d * V)
    flops = 2 * 3 * forward_per_sequence * 19073 * 256
    hours = flops / (312e12 * 0.40) / 3600
    assert run.flops == flops
    assert run.tokens == 19073 * 256 * 2048
    assert run.gpu_hours(plan.throughput) == pytest.approx(hours, rel=1e-12)
    assert 51 < hours < 52
    h100 = paper.Throughput(paper.GPUS["h100"], mfu=0.5)
    assert run.gpu_hours(h100) == pytest.approx(flops / (989e12 * 0.5) / 3600, rel=1e-12)
    assert plan.total_gpu_hours == pytest.approx(sum(r.gpu_hours(plan.throughput) for r in plan.runs))


def test_user_overrides_reach_every_run_and_the_cost(plan):
    short = paper.plan(overrides=["train.steps=100"], scales=["300m"], seeds=[0, 1])
    assert len(short.runs) == 2 * 7
    assert all(run.steps == 100 and run.command()[-1] == "train.steps=100" for run in short.runs)
    assert short.runs[0].flops * 19073 == plan.runs[0].flops * 100
    with pytest.raises(QkvlabError, match="sets seed itself"):
        paper.plan(overrides=["seed=3"])


def test_dry_run_prints_the_runs_commands_and_totals(plan, capsys):
    code, out, err = cli(["reproduce", "--preset", "paper", "--dry-run"], capsys)
    assert code == 0 and err == ""
    assert ("torchrun --nproc_per_node 8 -m qkvlab train lm-300m variant=Q-K=V seed=0 data_dir=DIR "
            "train.out_dir=runs/reproduce-paper/lm-300m/Q-K=V/seed0 train.grad_accum=4") in out
    assert "torchrun --nproc_per_node 8 -m qkvlab train lm-1.2b variant=Q-GQA-8 seed=0" in out
    assert all(run.command_line() in out for run in plan.runs)
    assert f"{plan.total_gpu_hours:,.0f} GPU-hours" in out and "total: 12 runs" in out
    assert "A100" in out and "312 TFLOP/s" in out and "MFU 0.4" in out


def test_dry_run_options(capsys):
    code, out, _ = cli(["reproduce", "--preset", "paper", "--dry-run", "--gpus", "4", "--gpu", "h100",
                        "--mfu", "0.5", "--scales", "1.2b", "--seeds", "0-1", "--out", "o"], capsys)
    assert code == 0
    assert "peak 989 TFLOP/s x MFU 0.5" in out and "total: 10 runs" in out and "lm-300m" not in out
    assert ("torchrun --nproc_per_node 4 -m qkvlab train lm-1.2b variant=GQA-8 seed=1 data_dir=DIR "
            "train.out_dir=o/lm-1.2b/GQA-8/seed1 train.grad_accum=32") in out


def test_without_cuda_it_prints_the_plan_and_exits_2(capsys):
    code, out, err = cli(["reproduce", "--preset", "paper"], capsys)
    assert code == 2 and "total: 12 runs" in out
    assert err.count("\n") == 1 and "no CUDA GPU found" in err and "--dry-run" in err


@pytest.mark.parametrize("kind", ["missing", "empty", "vocab"])
def test_bad_data_dir_is_one_line(tmp_path, kind, capsys):
    path = {"missing": tmp_path / "nope", "empty": tmp_path,
            "vocab": token_dir(tmp_path / "big", vocab=60000)}[kind]
    code, out, err = cli(["reproduce", "--preset", "paper", "--dry-run", "--data-dir", str(path)], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert ("not a token directory" in err) if kind != "vocab" else ("vocabulary of 60,000" in err)


def test_other_presets_refuse_paper_options(capsys):
    code, _, err = cli(["reproduce", "--preset", "quick", "--gpus", "8"], capsys)
    assert code == 2 and "--gpus applies only to --preset paper" in err
    code, _, err = cli(["reproduce", "--preset", "bogus"], capsys)
    assert code == 2 and "accepted: quick, full, tiny" in err and err.rstrip().endswith("paper")
    code, _, err = cli(["reproduce", "--preset", "paper", "--gpus", "3", "--dry-run"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--gpus 3 does not divide" in err


def test_with_cuda_it_launches_the_runs_in_turn(tmp_path, monkeypatch, capsys):
    data = token_dir(tmp_path / "tokens")
    launched: list[list[str]] = []

    def fake_run(argv, check):
        launched.append(argv)
        return subprocess.CompletedProcess(argv, 1 if len(launched) == 3 else 0)

    monkeypatch.setattr(paper, "cuda_devices", lambda: 8)
    monkeypatch.setattr(paper, "detect_gpu", lambda: paper.GPUS["h100"])
    monkeypatch.setattr(subprocess, "run", fake_run)
    out_dir = tmp_path / "out"
    argv = ["reproduce", "--preset", "paper", "--scales", "300m", "--data-dir", str(data), "--out", str(out_dir)]
    code, out, err = cli(argv, capsys)
    assert code == 1 and len(launched) == 3  # stops at the failed run
    assert "failed: lm-300m Q-K=V seed 0" in err and "H100 SXM" in out and "5,000 training tokens" in out
    assert launched[0][1:4] == ["-m", "torch.distributed.run", "--nproc_per_node"]
    assert launched[0][4:] == ["8", "-m", "qkvlab", "train", "lm-300m", "variant=QKV", "seed=0",
                               f"data_dir={data}", f"train.out_dir={out_dir}/lm-300m/QKV/seed0",
                               "train.grad_accum=4"]
    launched.clear()
    monkeypatch.setattr(paper, "cuda_devices", lambda: 4)
    code, _, err = cli([*argv, "--gpus", "8"], capsys)
    assert code == 2 and "--gpus 8 but this machine has 4 CUDA GPU(s)" in err and not launched
