"""Bad inputs to `qkvlab report` and `qkvlab analyze`: exit 2, one line naming the bad value, nothing changed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from qkvlab.cli.main import main
from qkvlab.models import ModelConfig, build_model
from qkvlab.models.io import save_model


def _run(root: Path, name: str, summary=None, config: bool = True) -> Path:
    run = root / "runs" / "lm" / name / "seed0"
    run.mkdir(parents=True)
    if summary is not None:
        (run / "summary.json").write_text(summary if isinstance(summary, str) else json.dumps(summary))
    if config:
        (run / "config.yaml").write_text(yaml.safe_dump({"task": "lm", "variant": name, "seed": 0}))
    return run


GOOD = {"status": "done", "task": "lm", "variant": "QKV", "seed": 0, "metric": "perplexity",
        "higher_is_better": False, "final": {"perplexity": 5.0}, "params": 10, "cache_fraction": 1.0}


def _good(root: Path) -> Path:
    return _run(root, "QKV", GOOD)


def _model(root: Path) -> Path:
    save_model(build_model(ModelConfig(n_layers=1, d_model=32, n_heads=4)), root / "model")
    return root / "model"


# (id, setup(root) -> argv, expected text in the one-line error)
CASES = [
    ("report-missing-dir", lambda r: ["report", str(r / "nope")], "nope' does not exist"),
    ("report-a-summary-file", lambda r: ["report", str(_good(r) / "summary.json")], "is a file, not a directory"),
    ("report-a-text-file", lambda r: (r / "notes.txt").write_text("x") and ["report", str(r / "notes.txt")],
     "notes.txt' is a file"),
    ("report-empty-dir", lambda r: (r / "runs").mkdir() or ["report", str(r / "runs")], "no finished runs"),
    ("report-corrupt-summary", lambda r: _good(r) and _run(r, "Q-K=V", "{trunc") and ["report", str(r / "runs")],
     "Q-K=V/seed0/summary.json' is not valid JSON"),
    ("report-summary-is-list", lambda r: _run(r, "QKV", "[1, 2]") and ["report", str(r / "runs")],
     "summary.json' holds a JSON list"),
    ("report-summary-lacks-fields", lambda r: _run(r, "QKV", {"status": "done"}) and ["report", str(r / "runs")],
     "lacks the field(s) task, variant, metric"),
    ("report-summary-no-final", lambda r: _run(r, "QKV", {**GOOD, "final": None}) and ["report", str(r / "runs")],
     "lacks the field 'final'"),
    ("report-summary-not-utf8", lambda r: _good(r) and (_run(r, "Q=X", None) / "summary.json").write_bytes(b"\xff\xfe")
     and ["report", str(r / "runs")], "summary.json' is not UTF-8"),
    ("report-unfinished-run", lambda r: _good(r) and _run(r, "Q=K=V", None) and ["report", str(r / "runs")],
     "Q=K=V/seed0: unfinished (no summary.json)"),
    ("report-failed-run", lambda r: _good(r) and _run(r, "MQA", {**GOOD, "status": "failed", "error": "boom"})
     and ["report", str(r / "runs")], "status 'failed': boom"),
    ("report-corrupt-config", lambda r: (_good(r) / "config.yaml").write_text("a: [") and ["report", str(r / "runs")],
     "config.yaml' cannot be read"),
    ("report-config-not-mapping", lambda r: (_good(r) / "config.yaml").write_text("- 1") and
     ["report", str(r / "runs")], "config.yaml' is not a run config"),
    ("report-allow-missing-nothing-left", lambda r: _run(r, "QKV", "[]") and
     ["report", str(r / "runs"), "--allow-missing"], "no finished runs"),
    ("report-out-onto-summary", lambda r: ["report", str(r / "runs"), "--out", str(_good(r) / "summary.json")],
     "summary.json' must end in .md"),
    ("report-out-beside-summary", lambda r: ["report", str(r / "runs"), "--out", str(_good(r) / "summary.md"),
                                             "--force"], "would overwrite"),
    ("report-out-existing", lambda r: _good(r) and (r / "old.md").write_text("mine") and
     ["report", str(r / "runs"), "--out", str(r / "old.md")], "old.md' already exists; pass --force"),
    ("report-out-json-sibling-existing", lambda r: _good(r) and (r / "x.json").write_text("{}") and
     ["report", str(r / "runs"), "--out", str(r / "x.md")], "x.json' already exists"),
    ("report-out-is-dir", lambda r: _good(r) and (r / "d.md").mkdir() or ["report", str(r / "runs"), "--out",
                                                                         str(r / "d.md")], "d.md' is a directory"),
    ("report-out-into-checkpoint", lambda r: ["report", str(r / "runs"), "--out",
                                              str(_good(r) / "checkpoints" / "r.md")], "a file of a run"),
    ("analyze-batch-zero", lambda r: ["analyze", str(_model(r)), "--random-inputs", "--batch", "0"],
     "--batch must be a positive integer, got 0"),
    ("analyze-batch-negative", lambda r: ["analyze", str(_model(r)), "--random-inputs", "--batch", "-3"],
     "got -3"),
    ("analyze-batch-huge", lambda r: ["analyze", str(_model(r)), "--random-inputs", "--batch", "99999999"],
     "--batch 99999999 is too large"),
    ("analyze-task-and-random", lambda r: ["analyze", str(_model(r)), "--task", "sort-32", "--random-inputs"],
     "not both"),
    ("analyze-task-mismatch", lambda r: ["analyze", str(_model(r)), "--task", "sort-32"],
     "task 'sort-32' does not match model"),
    ("analyze-no-task-recorded", lambda r: ["analyze", str(_model(r))], "records no task"),
    ("analyze-missing-model", lambda r: ["analyze", str(r / "ghost"), "--random-inputs"], "ghost' does not exist"),
    ("analyze-unknown-task", lambda r: ["analyze", str(_model(r)), "--task", "no-such-task"], "no-such-task"),
]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("setup, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(tmp_path, monkeypatch, capsys, setup, expected):
    root = tmp_path / "in"
    root.mkdir()
    argv = setup(root)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert expected in err, err
    assert _snapshot(tmp_path) == before  # nothing written, nothing changed


def test_allow_missing_reports_and_lists_the_skipped(tmp_path, capsys):
    _good(tmp_path)
    _run(tmp_path, "Q-K=V", "{trunc")
    assert main(["report", str(tmp_path / "runs"), "--allow-missing", "--no-analysis"]) == 0
    captured = capsys.readouterr()
    assert "Q-K=V" in captured.err and "not valid JSON" in captured.err
    assert "## Skipped runs" in (tmp_path / "runs" / "report.md").read_text()
    # an explicit --out is refused the second time, accepted with --force
    out = tmp_path / "r.md"
    assert main(["report", str(tmp_path / "runs"), "--allow-missing", "--no-analysis", "--out", str(out)]) == 0
    assert main(["report", str(tmp_path / "runs"), "--allow-missing", "--no-analysis", "--out", str(out)]) == 2
    assert main(["report", str(tmp_path / "runs"), "--allow-missing", "--no-analysis", "--out", str(out),
                 "--force"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["tasks"]["lm"]["variants"]["QKV"]["n_seeds"] == 1
