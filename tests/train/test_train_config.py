"""Run configs: YAML + dotted overrides onto typed dataclasses, clear one-line errors, the shipped recipes."""

from __future__ import annotations

import dataclasses

import pytest
from toy_task import ToyTask

from qkvlab.cli.main import main
from qkvlab.errors import QkvlabError
from qkvlab.models.config import PRESETS
from qkvlab.train.config import (
    RUNTIME_KEYS,
    ResolvedRun,
    differences,
    find_config,
    known_keys,
    load_config,
    packaged_configs,
    resolve_run,
)


def test_yaml_and_overrides_map_onto_typed_fields(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("task: toy\nvariant: tied-kv\noptim: {lr: 1.0e-3}\ntrain: {steps: 10}\nmodel: {n_layers: 3}\n")
    cfg = load_config(path, ["optim.lr=3e-4", "train.steps=1e3", "optim.betas=[0.8, 0.9]", "train.eval_every=0",
                             "variant=Q=K=V+", "model.dropout=0.1", "train.progress=false", "optim.grad_clip=null"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 1000 and isinstance(cfg.train.steps, int)
    assert cfg.optim.betas == (0.8, 0.9) and cfg.optim.grad_clip is None
    assert cfg.variant == "Q=K=V+" and cfg.model == {"n_layers": 3, "dropout": 0.1}
    assert cfg.train.progress is False and cfg.train.eval_every == 0
    assert load_config(path).variant == "Q-K=V"  # plain aliases become the paper's names


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("varient=QKV", "did you mean 'variant'?"),
    ("model.n_layer=2", "did you mean 'model.n_layers'?"),
    ("train.step=5", "did you mean 'train.steps'?"),
    ("trian.steps=5", "did you mean 'train.steps'?"),
    ("train.steps=abc", "'train.steps' must be a number, got 'abc'"),
    ("train.steps=2.5", "'train.steps' must be an integer"),
    ("train.steps=0", "train.steps must be positive"),
    ("train.progress=maybe", "'train.progress' must be true or false"),
    ("train.device=tpu", "train.device 'tpu' is not one of auto, cpu, cuda"),
    ("distributed.strategy=zero", "distributed.strategy 'zero' is not one of ddp, fsdp"),
    ("optim.betas=[0.9]", "'optim.betas' must be a list of 2 values"),
    ("variant=QXV", "unknown variant 'QXV'"),
    ("optim.lr", "is not KEY=VALUE"),
    ("optim=3", "config section 'optim' must be a mapping"),
])
def test_bad_keys_and_values_are_one_line_errors(override, message):
    with pytest.raises(QkvlabError) as err:
        load_config(None, ["task=toy", override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: toy\nschedule:\n  warmup: 3\n")
    with pytest.raises(QkvlabError, match="'schedule.warmup'; did you mean 'schedule.warmup_steps'"):
        load_config(bad)
    bad.write_text("task: [unclosed\n")
    with pytest.raises(QkvlabError, match="not valid YAML at line"):
        load_config(bad)
    with pytest.raises(QkvlabError, match="needs a task"):
        load_config(None, ["variant=QKV"])
    with pytest.raises(QkvlabError, match="did you mean the packaged config 'lm-300m'"):
        find_config("lm-300")


def test_cli_config_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert main(["train", "task=toy", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"qkvlab: error: config file {str(tmp_path / 'missing.yaml')!r} does not exist",
                   "qkvlab: error: unknown config key 'optim.lrr'; did you mean 'optim.lr'?"]


def test_resolve_fills_the_budget_and_keeps_explicit_values():
    task = ToyTask()
    run = resolve_run(load_config(None, ["task=toy", "preset=tiny", "train.steps=12"]), task)
    cfg, budget = run.config, task.budget("tiny")
    assert run.task is task and run.model == task.model_config("QKV", "tiny") and run.notes == ()
    assert cfg.train.steps == 12 and cfg.train.batch_size == budget.batch_size
    assert cfg.optim.lr == budget.lr and cfg.schedule.warmup_steps == budget.warmup_steps
    assert cfg.train.checkpoint_every == budget.eval_every
    assert cfg.train.out_dir == "runs/toy/QKV/seed0"
    with pytest.raises(QkvlabError, match="no budget for preset 'huge'"):
        resolve_run(load_config(None, ["task=toy", "preset=huge"]), task)
    run = resolve_run(load_config(None, ["task=toy", "variant=MQA", "model.n_layers=3"]), task)
    assert run.model.n_layers == 3 and run.model.variant == "MQA"
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.model = None


class _SetUpToy(ToyTask):
    """Records how it was set up."""

    calls: list

    def setup(self, model, preset):
        self.calls = [*getattr(self, "calls", []), (model, preset)]


def test_resolution_sets_the_task_up_once_for_the_model_it_chose(tmp_path):
    task = _SetUpToy()
    run = resolve_run(load_config(None, ["task=toy", "preset=tiny", "model.d_model=8"]), task)
    assert isinstance(run, ResolvedRun) and task.calls == [(run.model, "tiny")] and run.model.d_model == 8
    task.model_config("QKV", "quick")  # describing a model sets nothing up
    assert len(task.calls) == 1


def test_language_and_vision_tasks_follow_their_setup_not_model_config():
    from qkvlab.tasks.registry import get_task

    lm = get_task("shakespeare-char")
    lm.model_config("QKV", "full")
    assert lm.context == 64  # quick's until set up
    run = resolve_run(load_config(None, ["task=shakespeare-char", "preset=full", "model.max_seq_len=96"]))
    assert run.model.max_seq_len == 96 and run.task.context == 96
    vision = get_task("mnist")
    vision.model_config("QKV", "full")
    assert vision.augmenting is False
    assert resolve_run(load_config(None, ["task=mnist", "preset=full"])).task.augmenting is True
    assert resolve_run(load_config(None, ["task=mnist", "preset=quick"])).task.augmenting is False


def test_runtime_keys_do_not_count_as_differences():
    a = load_config(None, ["task=toy"])
    b = load_config(None, ["task=toy", "train.threads=2", "train.progress=false", "train.grad_accum=4"])
    assert differences(a, b) == []
    assert differences(a, load_config(None, ["task=toy", "seed=1"])) == ["seed: 0 -> 1"]
    assert set(RUNTIME_KEYS) <= set(known_keys())


def test_packaged_configs_load_and_the_paper_recipes_match_the_paper():
    shipped = packaged_configs()
    assert {"lm-300m", "lm-1.2b"} <= set(shipped) and len(shipped) >= 4
    for path in shipped.values():
        load_config(path)
    for name, preset, lr, warmup, strategy in (("lm-300m", "paper-300m", 2e-4, 500, "ddp"),
                                                ("lm-1.2b", "paper-1.2b", 6e-5, 1000, "fsdp")):
        cfg = load_config(find_config(name))
        assert cfg.optim.lr == lr and cfg.schedule.warmup_steps == warmup and cfg.schedule.kind == "cosine"
        assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.1 and cfg.optim.grad_clip == 1.0
        assert cfg.train.dtype == "bfloat16" and cfg.distributed.strategy == strategy
        run = resolve_run(cfg)
        model = run.model
        assert model == PRESETS[preset].replace(dropout=0.1) and run.task.context == model.max_seq_len
        tokens = cfg.train.steps * cfg.train.batch_size * model.max_seq_len
        assert 9.99e9 < tokens < 1.01e10  # the paper's 10B tokens
