"""The task registry: names, suites, variants, budgets and model configs of every task."""

from __future__ import annotations

import pytest

from qkvlab.errors import QkvlabError
from qkvlab.models import build_model
from qkvlab.tasks.base import Task
from qkvlab.tasks.registry import SUITES, data_for, get_task, task_names, variants_for
from qkvlab.variants import parse_variant


def test_suites_name_registered_tasks():
    assert set(SUITES) >= {"tiny", "quick", "full"}
    for suite in SUITES.values():
        for name in suite:
            assert name in task_names() and get_task(name).name == name
    families = {get_task(n).family for n in SUITES["quick"]}
    assert families == {"synthetic", "vision", "anomaly", "segmentation", "lm"}
    assert sorted(data_for(SUITES["quick"])) == ["mnist", "shakespeare"]
    assert {get_task(n).family for n in SUITES["tiny"]} == {"synthetic", "lm"}


def test_unknown_task_lists_names():
    with pytest.raises(QkvlabError, match="unknown task 'imagenet'; accepted: reverse, sort"):
        get_task("imagenet")
    assert get_task("reverse-128").length == 128
    assert get_task("reverse").length == 64


def test_variants_by_family():
    base = ["QKV", "Q=K-V", "Q-K=V", "Q=K=V", "Q=X"]
    assert variants_for(get_task("reverse")) == base + ["Q=K-V+", "Q=K=V+"]
    assert variants_for(get_task("mnist")) == base + ["Q=K-V+", "Q=K=V+"]
    assert variants_for(get_task("shakespeare-char")) == base + ["GQA-4", "MQA", "Q-GQA-4", "Q-MQA"]


@pytest.mark.parametrize("name", [n for n in task_names() if n != "tokens"])
def test_every_variant_and_preset_has_a_valid_model(name):
    task = get_task(name)
    assert isinstance(task, Task) and task.family and task.metric and task.name == name
    for preset in ("tiny", "quick", "full"):
        budget = task.budget(preset)
        assert budget.steps > 0 and budget.warmup_steps <= budget.steps
        for variant in variants_for(task):
            config = task.model_config(variant, preset)
            assert config.variant == parse_variant(variant).name
            assert config.causal == task.causal
    if name in SUITES["quick"]:
        params = sum(p.numel() for p in build_model(task.model_config("QKV", "quick")).parameters())
        assert params < 500_000  # quick runs must take about a minute on one core


def test_user_data_tasks_name_what_is_missing(tmp_path):
    with pytest.raises(QkvlabError, match="cifar-10-batches-py"):
        get_task("cifar10", data_dir=str(tmp_path)).train_batch(0, 2, 0)
    with pytest.raises(QkvlabError, match="--data-dir DIR"):
        get_task("tokens").train_batch(0, 2, 0)


def test_suites_read_only_what_their_fetch_group_provides():
    from qkvlab.data.sources import GROUPS, resolve

    assert set(data_for(SUITES["tiny"])) <= set(GROUPS["test"])  # other tests run the tiny suite in CI
    assert set(data_for(SUITES["quick"])) <= set(resolve(["quick"]))
    assert set(data_for(SUITES["full"])) <= set(resolve(["all"]))
