"""The training loop in-process on the toy task: exact resume, accumulation, the NaN guard, run-dir rules."""

from __future__ import annotations

import math

import pytest
import torch
from toy_task import NanToyTask, ToyTask
from trainkit import assert_same_weights, final_weights, losses, toy_config

from qkvlab.errors import QkvlabError
from qkvlab.train import trainer
from qkvlab.train.checkpoint import list_checkpoints, load_checkpoint
from qkvlab.train.metrics import read_metrics
from qkvlab.train.runs import read_summary
from qkvlab.train.trainer import TrainingDiverged, train


class Crash(Exception):
    pass


class CrashingToyTask(ToyTask):
    """Dies while building the batch of step `at` (after the checkpoint of step 8)."""

    def __init__(self, at: int):
        self.at = at

    def train_batch(self, step, batch_size, seed):
        if step == self.at:
            raise Crash(step)
        return super().train_batch(step, batch_size, seed)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    whole = train(toy_config(tmp_path / "whole"), task=ToyTask())
    cfg = toy_config(tmp_path / "split")
    with pytest.raises(Crash):
        train(cfg, task=CrashingToyTask(at=13))
    assert [s for s, _ in list_checkpoints(tmp_path / "split")] == [8]
    assert max(s for s, _ in losses(tmp_path / "split")) == 13  # logged past the checkpoint before dying
    resumed = train(cfg, task=ToyTask())
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    assert_same_weights(final_weights(tmp_path / "split"), final_weights(tmp_path / "whole"))
    assert resumed["final"] == whole["final"]
    _, state_a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "step_24")
    _, state_b = load_checkpoint(tmp_path / "split" / "checkpoints" / "step_24")
    for key, value in state_a["optimizer"]["state"].items():
        assert torch.equal(value["exp_avg_sq"], state_b["optimizer"]["state"][key]["exp_avg_sq"])


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    one = toy_config(tmp_path / "one", "model.dropout=0")
    four = toy_config(tmp_path / "four", "model.dropout=0", "train.grad_accum=4")
    train(one, task=ToyTask())
    train(four, task=ToyTask())
    (a, b) = losses(tmp_path / "one"), losses(tmp_path / "four")
    assert [s for s, _ in a] == [s for s, _ in b]
    assert [x for _, x in a] == pytest.approx([x for _, x in b], rel=1e-5)
    wa, wb = final_weights(tmp_path / "one"), final_weights(tmp_path / "four")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = toy_config(tmp_path / "nan", "train.checkpoint_every=5", "train.eval_every=0")
    with pytest.raises(TrainingDiverged, match=r"loss nan at step 8 .*last good checkpoint is .*step_5"):
        train(cfg, task=NanToyTask())
    assert [s for s, _ in list_checkpoints(tmp_path / "nan")] == [5]
    weights, state = load_checkpoint(tmp_path / "nan" / "checkpoints" / "step_5")
    assert state["step"] == 5 and all(torch.isfinite(w).all() for w in weights.values())
    summary = read_summary(tmp_path / "nan")
    assert summary["status"] == "diverged" and summary["step"] == 7
    assert train(cfg, task=NanToyTask())["status"] == "diverged"  # a finished run is not retried


def test_finished_run_is_skipped_and_a_changed_config_refused(tmp_path):
    cfg = toy_config(tmp_path / "run")
    first = train(cfg, task=ToyTask())
    n_records = len(read_metrics(tmp_path / "run" / "metrics.jsonl"))
    quiet = toy_config(tmp_path / "run", "train.log_every=5")  # runtime keys may change
    assert train(quiet, task=ToyTask()) == first
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == n_records
    with pytest.raises(QkvlabError, match=r"another config \(optim.lr: 0.03 -> 0.01\)"):
        train(toy_config(tmp_path / "run", "optim.lr=0.01"), task=ToyTask())
    again = train(toy_config(tmp_path / "run", "optim.lr=0.01"), task=ToyTask(), restart=True)
    assert again["status"] == "done" and again["final"] != first["final"]


def test_batch_must_divide_into_micro_batches(tmp_path):
    with pytest.raises(QkvlabError, match="train.batch_size=8 must be divisible"):
        train(toy_config(tmp_path / "r", "train.grad_accum=3"), task=ToyTask())


def test_summary_records_params_and_cache(tmp_path):
    summary = train(toy_config(tmp_path / "r", "variant=Q-K=V", "train.steps=4"), task=ToyTask())
    assert summary["params"] == sum(p.numel() for p in ToyTask().build_model(
        ToyTask().model_config("QKV")).parameters())
    assert summary["cache_fraction"] == 0.5 and math.isclose(summary["cache_reduction"], 0.5)
    assert summary["variant"] == "Q-K=V" and summary["metric"] == "accuracy"


@pytest.mark.parametrize("avx512_bf16, amx, expect", [(True, False, True), (False, True, True), (False, False, False),
                                                     (None, None, False)])
def test_native_bf16_is_read_from_torch_cpu(avx512_bf16, amx, expect, monkeypatch):
    for name, value in (("_is_avx512_bf16_supported", avx512_bf16), ("_is_amx_tile_supported", amx)):
        if value is None:  # an older torch without the probe: float32
            monkeypatch.delattr(torch.cpu, name, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, name, lambda value=value: value)
    assert trainer.cpu_has_native_bf16() is expect


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bfloat16_where_the_cpu_has_it(native, monkeypatch):
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert trainer._autocast_dtype("auto", cpu) == (torch.bfloat16 if native else None)
    assert trainer._autocast_dtype("bfloat16", cpu) == torch.bfloat16
    assert trainer._autocast_dtype("float32", cpu) is None


def test_summary_records_the_precision_and_a_resume_in_another(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: False)
    assert train(toy_config(tmp_path / "a", "train.steps=4"), task=ToyTask())["precision"] == "float32"
    assert train(toy_config(tmp_path / "b", "train.steps=4", "train.dtype=bfloat16"),
                 task=ToyTask())["precision"] == "bfloat16"
    # train.dtype=auto resumed on a machine where it resolves differently: said, and recorded
    with pytest.raises(Crash):
        train(toy_config(tmp_path / "c", "train.dtype=auto"), task=CrashingToyTask(at=13))
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: True)
    summary = train(toy_config(tmp_path / "c", "train.dtype=auto"), task=ToyTask())
    assert summary["precision"] == "float32 then bfloat16"
    out = capsys.readouterr().out
    assert "steps up to 8 ran in float32, the rest runs in bfloat16" in out
    assert out.count("training in bfloat16 autocast: this CPU multiplies bfloat16 in hardware") == 1


def test_init_from_starts_at_the_saved_weights(tmp_path):
    from qkvlab.models import build_model
    from qkvlab.models.io import save_model
    from qkvlab.tasks.registry import get_task

    source = build_model(get_task("reverse-16").model_config("Q-K=V", "tiny"))
    save_model(source, tmp_path / "export")
    cfg = toy_config(tmp_path / "run", "train.steps=1", "optim.lr=1e-12", "variant=Q-K=V",
                     f"init_from={tmp_path / 'export'}", task="reverse-16")
    train(cfg)
    trained = final_weights(tmp_path / "run")
    for name, value in source.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=1e-9)
    with pytest.raises(QkvlabError, match="holds a Q-K=V model but the run's variant is QKV"):
        train(toy_config(tmp_path / "other", "variant=QKV", f"init_from={tmp_path / 'export'}", task="reverse-16"))
