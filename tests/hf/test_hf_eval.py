"""qkvlab eval: lm-eval's HFLM on a local multiple-choice task (YAML + jsonl written here), offline."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("lm_eval")

from qkvlab.cli.main import main  # noqa: E402
from qkvlab.models import ModelConfig, build_model  # noqa: E402
from qkvlab.models.io import save_model  # noqa: E402

TASK = """task: qkvlab_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.slow
def test_eval_local_task_on_an_export(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # nothing cached from elsewhere
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [{"question": f"{i} + 1 =", "choices": [" 1", " 2", " 3"], "answer": i % 3} for i in range(5)]
    (tasks / "local.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "local.yaml").write_text(TASK.format(data=tasks / "local.jsonl"))
    model = build_model(ModelConfig(kind="decoder", variant="Q-K=V", n_layers=1, d_model=32, n_heads=4,
                                    max_seq_len=32, vocab_size=256), seed=0)
    save_model(model, tmp_path / "m")
    assert main(["export", str(tmp_path / "m"), "--out", str(tmp_path / "hf"), "--tokenizer", "bytes"]) == 0
    out = tmp_path / "results.json"
    assert main(["eval", str(tmp_path / "hf"), "--tasks", "qkvlab_local_mc", "--include-path", str(tasks),
                 "--limit", "4", "--output", str(out)]) == 0
    acc = json.loads(out.read_text())["results"]["qkvlab_local_mc"]["acc"]
    assert math.isfinite(acc) and 0 <= acc <= 1
    capsys.readouterr()
    # a checkpoint directly (tokenizer given), and an unknown task as one line
    assert main(["eval", str(tmp_path / "m"), "--tokenizer", "bytes", "--tasks", "nope",
                 "--include-path", str(tasks)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown task(s) nope" in err and "qkvlab_local_mc" in err
