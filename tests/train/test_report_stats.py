"""The report's statistics: paired t-intervals with known answers, config groups never pooled, report.json."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import yaml

from qkvlab.train.report import aggregate, collect, report_data, scan, task_markdown, write_report
from qkvlab.train.runs import variant_slug
from qkvlab.train.stats import paired_change, t_interval, t_quantile_975

CONFIG = {"task": "lm", "preset": "tiny", "model": {}, "optim": {"lr": 0.01},
          "schedule": {"warmup_steps": 2}, "train": {"steps": 10, "batch_size": 4, "threads": 1}}


def fake_run(root, task, variant, seed, value, *, status="done", higher=False, config=CONFIG, extra_final=None,
             sub="", precision=None):
    """A run directory as the trainer leaves it (summary.json, config.yaml, metrics.jsonl), without training."""
    run_dir = root / sub / task / variant_slug(variant) / f"seed{seed}"
    run_dir.mkdir(parents=True)
    summary = {"status": status, "task": task, "family": "lm", "variant": variant, "seed": seed, "preset": "tiny",
               "metric": "perplexity", "higher_is_better": higher,
               "final": {"perplexity": value, "eval_examples": 1000, **(extra_final or {})}, "steps": 10,
               "step": 10, "params": 1_234_567, "cache_fraction": 0.5 if variant != "QKV" else 1.0,
               "wall_time_s": 1.0, **({"precision": precision} if precision else {})}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    if config is not None:
        cfg = {**config, "task": task, "variant": variant, "seed": seed,
               "train": {**config["train"], "out_dir": str(run_dir)}}
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"split": "train", "step": s, "loss": 5.0 / s}) + "\n" for s in range(1, 11)) +
        json.dumps({"split": "eval", "step": 10, "perplexity": value}) + "\n")
    return run_dir


def test_t_quantiles():
    assert t_quantile_975(1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile_975(2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile_975(40) == pytest.approx(2.0211, abs=1e-3)  # expansion beyond the table
    assert t_quantile_975(120) == pytest.approx(1.9799, abs=1e-3)
    assert t_quantile_975(31) == pytest.approx(2.0395, abs=1e-3)
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_paired_interval_known_answer():
    # baseline 100 each seed, variant +1, +2, +3 %: changes 1, 2, 3; mean 2, sd 1, half = 4.3027 / sqrt(3)
    change = paired_change({0: 101.0, 1: 102.0, 2: 103.0}, {0: 100.0, 1: 100.0, 2: 100.0})
    half = 4.302653 / math.sqrt(3)
    assert change.seeds == (0, 1, 2) and change.changes == pytest.approx((1.0, 2.0, 3.0))
    assert change.mean == pytest.approx(2.0)
    assert change.ci95 == pytest.approx((2.0 - half, 2.0 + half), abs=1e-3)  # (-0.484, 4.484)
    assert change.distinguishable is False  # the interval contains 0


def test_paired_interval_is_paired_not_pooled():
    # seeds differ a lot, but each seed's variant is exactly 5 % above its baseline: a tight interval
    base = {0: 1.0, 1: 2.0, 2: 4.0}
    change = paired_change({s: v * 1.05 for s, v in base.items()}, base)
    assert change.ci95 == pytest.approx((5.0, 5.0))
    assert change.distinguishable is True
    # only seeds both have are paired; one seed gives no interval
    one = paired_change({0: 2.0, 7: 3.0}, {0: 1.0, 1: 1.0})
    assert one.seeds == (0,) and one.mean == pytest.approx(100.0) and one.ci95 is None
    assert one.distinguishable is None
    assert t_interval([1.0]) is None


def test_bootstrap_option():
    change = paired_change({0: 101.0, 1: 102.0, 2: 103.0}, {0: 100.0, 1: 100.0, 2: 100.0}, method="bootstrap")
    assert 1.0 <= change.ci95[0] <= 2.0 <= change.ci95[1] <= 3.0


def test_report_table_from_known_seeds(tmp_path):
    for seed, (a, b) in enumerate([(5.0, 5.2), (5.2, 5.6), (5.1, 5.4)]):
        fake_run(tmp_path, "lm", "QKV", seed, a)
        fake_run(tmp_path, "lm", "Q-K=V", seed, b)
    fake_run(tmp_path, "lm", "Q-K=V", 3, math.nan, status="diverged")
    (table,) = aggregate(collect(tmp_path))
    changes = [100 * 0.2 / 5.0, 100 * 0.4 / 5.2, 100 * 0.3 / 5.1]
    row = table.rows["Q-K=V"]
    assert row.mean == pytest.approx(statistics.fmean([5.2, 5.6, 5.4])) and row.diverged == 1
    assert row.change.mean == pytest.approx(statistics.fmean(changes))
    half = 4.302653 * statistics.stdev(changes) / math.sqrt(3)
    assert row.change.ci95 == pytest.approx((statistics.fmean(changes) - half, statistics.fmean(changes) + half),
                                            abs=1e-3)
    md = task_markdown(table)
    lo, hi = row.change.ci95
    row_md = f"| Q-K=V | 5.4000 ± 0.2000 (1 diverged) | 3 | +5.9 % | [{lo:+.1f}, {hi:+.1f}] % | **beyond seed noise**"
    assert row_md in md
    assert "evaluated on 1,000 held-out examples" in md
    assert "| – | – | – | – | 10 | 4 | 0.01 | 2 | – | 1.23M |" in md  # hyperparameters (no checkpoint: sizes unknown)


def test_one_seed_says_no_interval(tmp_path):
    fake_run(tmp_path, "lm", "QKV", 0, 5.0)
    fake_run(tmp_path, "lm", "Q=K=V", 0, 5.5)
    (table,) = aggregate(collect(tmp_path))
    assert "| – | n/a (1 seed) |" in task_markdown(table)


def test_configs_differing_in_one_key_are_never_pooled(tmp_path):
    other = {**CONFIG, "optim": {"lr": 0.1}}
    for seed in range(2):
        fake_run(tmp_path, "lm", "QKV", seed, 5.0 + seed)
        fake_run(tmp_path, "lm", "Q-K=V", seed, 5.5 + seed)
    fake_run(tmp_path, "lm", "Q-K=V", 2, 9.0, config=other)
    fake_run(tmp_path, "lm", "QKV", 2, 8.0, config=other)
    tables = aggregate(collect(tmp_path))
    assert [t.name for t in tables] == ["lm", "lm [optim.lr=0.1]"]
    main, odd = tables
    assert sorted(main.rows["Q-K=V"].seeds) == [0, 1] and sorted(odd.rows["Q-K=V"].seeds) == [2]
    assert odd.differs == ["optim.lr: 0.01 -> 0.1"]
    assert "configs differ in `optim.lr: 0.01 -> 0.1`" in task_markdown(odd)
    data = report_data(tables, "tiny", 1.0)
    assert data["tasks"]["lm"]["variants"]["Q-K=V"]["n_seeds"] == 2
    assert data["tasks"]["lm [optim.lr=0.1]"]["variants"]["Q-K=V"]["n_seeds"] == 1


def test_auto_precision_is_grouped_by_what_it_resolved_to(tmp_path):
    """train.dtype=auto trains in bfloat16 on one machine and float32 on another: those runs are never pooled."""
    auto = {**CONFIG, "train": {**CONFIG["train"], "dtype": "auto"}}
    for seed in range(2):
        fake_run(tmp_path, "lm", "QKV", seed, 5.0 + seed, config=auto, precision="bfloat16")
        fake_run(tmp_path, "lm", "Q-K=V", seed, 5.5 + seed, config=auto, precision="bfloat16")
    fake_run(tmp_path, "lm", "QKV", 2, 8.0, config=auto, precision="float32")
    main, odd = aggregate(collect(tmp_path))
    assert odd.differs == ["train.dtype: 'bfloat16' -> 'float32'"] and sorted(main.rows["QKV"].seeds) == [0, 1]
    assert "| 10 | 4 | 0.01 | 2 | bfloat16 | 1.23M |" in task_markdown(main)


def test_runtime_keys_and_out_dir_do_not_split_groups(tmp_path):
    fake_run(tmp_path, "lm", "QKV", 0, 5.0)
    fake_run(tmp_path, "lm", "QKV", 1, 5.1, config={**CONFIG, "train": {**CONFIG["train"], "threads": 2}})
    (table,) = aggregate(collect(tmp_path))
    assert table.rows["QKV"].n == 2


def test_report_json_shape(tmp_path):
    for seed in range(3):
        fake_run(tmp_path, "lm", "QKV", seed, 5.0 + 0.1 * seed)
        fake_run(tmp_path, "lm", "Q-K=V", seed, 5.2 + 0.05 * seed)
    fake_run(tmp_path, "lm", "Q=K=V", 0, 6.0)
    path = write_report(tmp_path, preset="tiny", wall_s=12.5, command="qkvlab reproduce --preset tiny",
                        analyze=False)
    data = json.loads((tmp_path / "report.json").read_text())
    assert set(data) == {"preset", "wall_s", "tasks"} and data["preset"] == "tiny" and data["wall_s"] == 12.5
    task = data["tasks"]["lm"]
    assert task == {**task, "metric": "perplexity", "higher_is_better": False, "eval_examples": 1000}
    assert set(task) == {"metric", "higher_is_better", "eval_examples", "variants"}
    keys = {"n_seeds", "mean", "std", "delta_vs_qkv_pct", "ci95_delta_pct", "params", "cache_reduction"}
    for name, v in task["variants"].items():
        assert set(v) == keys, name
    assert task["variants"]["QKV"]["delta_vs_qkv_pct"] == 0.0 and task["variants"]["QKV"]["ci95_delta_pct"] is None
    lo, hi = task["variants"]["Q-K=V"]["ci95_delta_pct"]
    assert lo < task["variants"]["Q-K=V"]["delta_vs_qkv_pct"] < hi
    single = task["variants"]["Q=K=V"]
    assert single["n_seeds"] == 1 and single["std"] is None and single["ci95_delta_pct"] is None
    assert "NaN" not in (tmp_path / "report.json").read_text()
    text = path.read_text()
    assert "qkvlab reproduce --preset tiny" in text and "12 s" in text and "cores" in text and "torch" in text
    assert not list((tmp_path / "plots").glob(".*"))  # no temporary PNGs left


def test_unreadable_runs_are_listed(tmp_path):
    fake_run(tmp_path, "lm", "QKV", 0, 5.0)
    bad = fake_run(tmp_path, "lm", "Q-K=V", 0, 5.0)
    (bad / "summary.json").write_text("{not json")
    listed = fake_run(tmp_path, "lm", "Q=K=V", 0, 5.0)
    (listed / "summary.json").write_text("[1, 2]")
    found, skipped = scan(tmp_path)
    assert len(found) == 1 and {s.run_dir.name for s in skipped} == {"seed0"} and len(skipped) == 2
    assert any("not valid JSON" in s.reason for s in skipped) and any("JSON list" in s.reason for s in skipped)
    text = write_report(tmp_path, analyze=False).read_text()
    assert "## Skipped runs" in text and "Q-K=V" in text.split("## Skipped runs")[1]


def test_a_full_disk_while_plotting_leaves_the_previous_report(tmp_path, monkeypatch):
    import errno

    from matplotlib.figure import Figure

    from qkvlab.errors import QkvlabError

    fake_run(tmp_path, "lm", "QKV", 0, 5.0)
    write_report(tmp_path, analyze=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "plots").iterdir()}
    report = (tmp_path / "report.md").read_bytes()

    def full(self, fname, **kwargs):
        open(fname, "wb").write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full)
    with pytest.raises(QkvlabError, match="No space left"):
        write_report(tmp_path, analyze=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "plots").iterdir()} == before  # no temp file, no half PNG
    assert (tmp_path / "report.md").read_bytes() == report


def test_tiny_end_to_end_report_with_analysis(tmp_path):
    """Two real (very short) runs of a synthetic task, then the report with the analysis of the trained models."""
    from qkvlab.cli.main import main

    for variant in ("QKV", "Q=K-V"):
        out = tmp_path / "reverse-16" / variant_slug(variant) / "seed0"
        assert main(["train", "task=reverse-16", f"variant={variant}", "preset=tiny", "train.steps=2",
                     "schedule.warmup_steps=1", "train.eval_every=0", "train.eval_batches=1", "train.threads=1",
                     "train.progress=false", "train.tensorboard=false", f"train.out_dir={out}"]) == 0
    text = write_report(tmp_path, analysis_batch=2).read_text()
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines()
            if line.startswith("| Q") and line.count(" | ") == 8}  # the analysis table
    assert set(rows) == {"QKV", "Q=K-V"}, text
    assert float(rows["Q=K-V"][3]) == pytest.approx(1.0, abs=1e-3)  # cos(Q,K) with Q = K
    assert float(rows["Q=K-V"][-1].rstrip(" |")) == pytest.approx(0.0, abs=1e-3)  # symmetric scores
    assert float(rows["QKV"][-1].rstrip(" |")) > 0.01
    assert (tmp_path / "plots" / "analysis_reverse-16.png").is_file()
    assert "evaluated on 32 held-out examples (0.8 % of the split)" in text
