"""Sweeps (skip finished runs, relaunch stale ones, several processes) and the report built from them."""

from __future__ import annotations

import json
import math
import statistics
import sys

import pytest
from PIL import Image
from trainkit import subprocess_env

from qkvlab.cli.main import main
from qkvlab.train.report import aggregate, collect, summary_table, task_markdown, write_report
from qkvlab.train.runs import variant_slug
from qkvlab.train.sweep import plan, run_sweep

TINY = ["train.tensorboard=false", "train.steps=12", "train.eval_every=6"]


@pytest.mark.slow
def test_tiny_sweep_then_report(tmp_path):
    runs = plan(tmp_path, ["toy_task:ToyTask"], [0, 1], variants=["QKV", "Q-K=V", "Q-MQA"], preset="tiny",
                overrides=TINY)
    assert {r.run_dir.relative_to(tmp_path).as_posix() for r in runs} >= {"toy/QKV/seed0", "toy/Q-MQA/seed1"}
    assert variant_slug("Q=X/GQA-1") == "Q=X_MQA"
    results = run_sweep(runs, jobs=3, threads=1, progress=False, env=subprocess_env())
    assert sorted(r.status for r in results) == ["done"] * 6, [r.message for r in results]
    again = run_sweep(runs, jobs=3, threads=1, progress=False, env=subprocess_env())
    assert [r.status for r in again] == ["skipped"] * 6

    report = write_report(tmp_path)
    text = report.read_text()
    summaries = collect(tmp_path)
    assert len(summaries) == 6
    for variant in ("QKV", "Q-K=V", "Q-MQA"):
        values = [s["final"]["accuracy"] for s in summaries if s["variant"] == variant]
        row = next(line for line in text.splitlines() if line.startswith(f"| {variant} |"))
        assert f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}" in row
    cache = {line.split(" | ")[0][2:]: line.split(" | ")[-1] for line in text.splitlines() if line.startswith("| Q")}
    assert cache == {"QKV": "0.0 % |", "Q-K=V": "50.0 % |", "Q-MQA": "75.0 % |"}  # 2 heads: Q-MQA keeps 1 of 4
    for png in ("quality_vs_cache.png", "learning_curves_toy.png"):
        with Image.open(tmp_path / "plots" / png) as image:
            assert image.format == "PNG" and image.size[0] > 300


@pytest.mark.slow
def test_a_finished_run_with_another_config_is_relaunched_and_refused(tmp_path):
    run = plan(tmp_path, ["toy_task:ToyTask"], [0], variants=["QKV"], preset="tiny", overrides=TINY)
    assert run_sweep(run, threads=1, progress=False, env=subprocess_env())[0].status == "done"
    changed = plan(tmp_path, ["toy_task:ToyTask"], [0], variants=["QKV"], preset="tiny",
                   overrides=TINY + ["optim.lr=0.1"])
    result = run_sweep(changed, threads=1, progress=False, env=subprocess_env())[0]
    assert result.status == "failed" and "another config (optim.lr: 0.03 -> 0.1)" in result.message
    # runtime-only changes keep the finished run
    quiet = plan(tmp_path, ["toy_task:ToyTask"], [0], variants=["QKV"], preset="tiny",
                 overrides=TINY + ["train.log_every=4"])
    assert run_sweep(quiet, threads=1, progress=False, env=subprocess_env())[0].status == "skipped"


def _fake_run(root, task, variant, seed, value, status="done", higher=True):
    run_dir = root / task / variant_slug(variant) / f"seed{seed}"
    run_dir.mkdir(parents=True)
    summary = {"status": status, "task": task, "family": "lm", "variant": variant, "seed": seed,
               "metric": "perplexity", "higher_is_better": higher, "final": {"perplexity": value}, "steps": 10,
               "step": 10, "params": 1_234_567, "cache_fraction": 0.5 if variant != "QKV" else 1.0,
               "wall_time_s": 1.0}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"split": "train", "step": s, "loss": 5.0 / s}) + "\n" for s in range(1, 11)) +
        json.dumps({"split": "eval", "step": 10, "perplexity": value}) + "\n")


def test_report_statistics_from_known_summaries(tmp_path):
    for seed, (a, b) in enumerate([(5.0, 5.2), (5.2, 5.6)]):
        _fake_run(tmp_path, "lm", "QKV", seed, a, higher=False)
        _fake_run(tmp_path, "lm", "Q-K=V", seed, b, higher=False)
    _fake_run(tmp_path, "lm", "Q-K=V", 2, math.nan, status="diverged", higher=False)
    (table,) = aggregate(collect(tmp_path))
    assert table.rows["QKV"].mean == pytest.approx(5.1) and table.rows["Q-K=V"].mean == pytest.approx(5.4)
    assert table.rows["Q-K=V"].std == pytest.approx(statistics.stdev([5.2, 5.6]))
    assert table.relative("Q-K=V") == pytest.approx((0.2 / 5.0 + 0.4 / 5.2) / 2)  # mean of per-seed changes
    assert table.rows["Q-K=V"].diverged == 1
    md = task_markdown(table)
    assert "| Q-K=V | 5.4000 ± 0.2828 (1 diverged) | 2 | +5.8 % | [" in md and "| 1.23M | 50.0 % |" in md
    assert "perplexity** (lower is better)" in md
    assert "5.4000 (+5.8 %" in summary_table([table])


def test_report_cli(tmp_path, capsys):
    _fake_run(tmp_path, "lm", "QKV", 0, 5.0)
    assert main(["report", str(tmp_path)]) == 0
    assert f"report: {tmp_path / 'report.md'}" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nothing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no finished runs" in capsys.readouterr().err


@pytest.mark.slow
def test_reproduce_runs_every_variant_and_prints_the_report(tmp_path, capsys, monkeypatch):
    for key, value in subprocess_env().items():
        monkeypatch.setenv(key, value)
    code = main(["reproduce", "--preset", "tiny", "--tasks", "toy_task:ToyTask", "--out", str(tmp_path), "--jobs", "2",
                 "train.steps=6", "train.tensorboard=false"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"report: {tmp_path / 'report.md'}" in out
    variants = ["QKV", "Q=K-V", "Q-K=V", "Q=K=V", "Q=X", "Q=K-V+", "Q=K=V+"]  # variants_for a non-causal task
    table = out[out.index("variant"):out.index("report:")].splitlines()
    assert [line.split()[0] for line in table[2:] if line.strip()] == variants
    assert sorted(p.name for p in (tmp_path / "toy").iterdir()) == sorted(variants)


def test_job_slots_get_their_own_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    record = ("import os, sys; out = [a.split('=', 1)[1] for a in sys.argv if a.startswith('train.out_dir=')][0]; "
              "open(os.path.join(out, 'gpu'), 'w').write(os.environ['CUDA_VISIBLE_DEVICES'])")
    runs = plan(tmp_path, ["toy_task:ToyTask"], [0, 1], variants=["QKV", "MQA"], preset="tiny")
    results = run_sweep(runs, jobs=2, progress=False, command=[sys.executable, "-c", record])
    assert all(r.status == "failed" for r in results)  # the stand-in writes no summary
    assert {(r.run_dir / "gpu").read_text() for r in runs} == {"3", "5"}  # slot i sees device i only
