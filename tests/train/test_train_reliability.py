"""Reliability of runs: one process per run directory, children die with their sweep, a full disk loses
nothing, sweeps compare full resolved configs, overrides set a field once, run directories extend."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from toy_task import SlowToyTask, ToyTask
from trainkit import TOY, assert_same_weights, final_weights, losses, qkvlab_cmd, subprocess_env, toy_config

from qkvlab.cli.main import main
from qkvlab.errors import QkvlabError
from qkvlab.models import build_model
from qkvlab.models.config import preset
from qkvlab.models.io import save_model
from qkvlab.train import checkpoint as ckpt
from qkvlab.train import metrics as metrics_module
from qkvlab.train.config import load_config, resolve_run
from qkvlab.train.lock import LOCK, DirLock
from qkvlab.train.metrics import MetricsLogger, read_metrics
from qkvlab.train.runs import read_summary, run_status, summary_problem
from qkvlab.train.sweep import plan, run_sweep
from qkvlab.train.trainer import train

SLOW_TOY = "toy_task:SlowToyTask"


def _lock_owner(run_dir: Path, timeout: float = 60) -> int:
    """The pid in the run directory's lock file, once a process holds it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = (run_dir / LOCK).read_text().strip() if (run_dir / LOCK).is_file() else ""
        if text.isdigit():
            return int(text)
        time.sleep(0.02)
    raise AssertionError(f"nobody locked {run_dir}")


def _gone(pid: int) -> bool:
    """Whether `pid` exited (a zombie nobody reaped counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return "State:\tZ" in status


# --- one process per run directory -------------------------------------------------------

@pytest.mark.slow
def test_second_trainer_on_a_locked_run_dir_is_refused_and_the_first_is_undisturbed(tmp_path, capsys):
    args = [f"task={SLOW_TOY}", "preset=tiny", "train.steps=30", "train.threads=1", "train.progress=false",
            "train.tensorboard=false"]
    first = subprocess.Popen(qkvlab_cmd("train", *args, f"train.out_dir={tmp_path / 'run'}"), env=subprocess_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    owner = _lock_owner(tmp_path / "run")
    assert owner == first.pid
    assert main(["train", *args, f"train.out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"qkvlab: error: run directory {str(tmp_path / 'run')!r} is in use by another qkvlab process "
                   f"(pid {owner}); wait for it to finish or stop it"]
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out
    assert not (tmp_path / "run" / LOCK).exists()  # released
    train(load_config(None, args + [f"train.out_dir={tmp_path / 'alone'}"]), task=SlowToyTask())
    assert_same_weights(final_weights(tmp_path / "run"), final_weights(tmp_path / "alone"))
    assert losses(tmp_path / "run") == losses(tmp_path / "alone")


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK).write_text(f"{dead.pid}\n")
    train(toy_config(tmp_path / "run", "train.steps=4"), task=ToyTask())
    assert f"taking over the lock of {str(tmp_path / 'run')!r} from pid {dead.pid} (no longer running)" in \
        capsys.readouterr().err
    assert read_summary(tmp_path / "run")["status"] == "done"


def test_a_lock_made_for_nothing_leaves_no_directory(tmp_path):
    with DirLock(tmp_path / "a" / "b"):
        assert (tmp_path / "a" / "b" / LOCK).read_text().strip() == str(os.getpid())
        with pytest.raises(QkvlabError, match=rf"in use by another qkvlab process \(pid {os.getpid()}\)"):
            DirLock(tmp_path / "a" / "b").acquire()
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_killing_a_sweep_ends_its_runs(tmp_path):
    cmd = qkvlab_cmd("sweep", "--out", str(tmp_path), "--tasks", SLOW_TOY, "--variants", "QKV,Q-K=V", "--jobs", "2",
                     "--threads", "1", "--preset", "tiny", "train.steps=5000", "train.tensorboard=false")
    sweep = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        children = [_lock_owner(tmp_path / "toy" / v / "seed0", timeout=90) for v in ("QKV", "Q-K=V")]
        assert _lock_owner(tmp_path) == sweep.pid  # the sweep owns its root
    finally:
        sweep.send_signal(signal.SIGKILL)
        sweep.wait()
    deadline = time.monotonic() + 15
    while not all(_gone(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(pid) for pid in children), "the sweep's runs outlived it"


# --- a full disk ----------------------------------------------------------------------------

def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_enospc_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg = toy_config(tmp_path / "run", "train.checkpoint_every=8")
    real, calls = ckpt.save_weights, []

    def failing(*args, **kwargs):
        calls.append(1)
        return _enospc() if len(calls) == 2 else real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_weights", failing)
    with pytest.raises(QkvlabError) as err:
        train(cfg, task=ToyTask())
    message = str(err.value)
    assert "\n" not in message and "could not write" in message and "step_16" in message
    assert "No space left on device" in message and "nothing was lost" in message
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [8]
    ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path / "run", 8))  # verified and loadable
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl", "train")] == list(range(1, 17))
    monkeypatch.setattr(ckpt, "save_weights", real)
    train(cfg, task=ToyTask())  # space is back: resumes from step 8 to the undisturbed result
    train(toy_config(tmp_path / "alone", "train.checkpoint_every=8"), task=ToyTask())
    assert_same_weights(final_weights(tmp_path / "run"), final_weights(tmp_path / "alone"))
    assert losses(tmp_path / "run") == losses(tmp_path / "alone")


def test_enospc_while_logging_metrics_leaves_whole_lines(tmp_path, monkeypatch):
    real, calls = os.write, []

    def torn(fd, data):  # the 12th record gets half written, then the disk is full
        calls.append(1)
        if len(calls) == 12:
            real(fd, data[: len(data) // 2])
            _enospc()
        return real(fd, data)

    monkeypatch.setattr(metrics_module.os, "write", torn)
    with pytest.raises(QkvlabError) as err:
        train(toy_config(tmp_path / "run"), task=ToyTask())
    message = str(err.value)
    assert "\n" not in message and "could not write metrics" in message and "nothing was lost" in message
    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())
    ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"))


def test_a_torn_metrics_tail_is_skipped_and_appends_stay_whole(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"split": "train", "step": 1, "loss": 1.0}\n{"split": "train", "st')
    assert [r["step"] for r in read_metrics(path)] == [1]
    logger = MetricsLogger(path, tensorboard=False)
    logger.truncate_after(1)
    logger.log("train", 2, loss=0.5)
    logger.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2] and path.read_text().count("\n") == 2


# --- sweeps compare the full resolved config ----------------------------------------------

def _trained_cell(root: Path, overrides: list[str]):
    (run,) = plan(root, [TOY], [0], variants=["QKV"], preset="tiny", overrides=overrides)
    train(load_config(None, run.train_args() + ["train.threads=1"]), task=ToyTask())
    return run


def test_a_removed_override_makes_a_finished_run_stale(tmp_path):
    base = ["train.tensorboard=false", "train.steps=6"]
    assert _trained_cell(tmp_path, base + ["optim.lr=0.1"]).is_current()
    (without,) = plan(tmp_path, [TOY], [0], variants=["QKV"], preset="tiny", overrides=base)
    assert not without.is_current()  # the stored lr 0.1 is not inherited: the request's lr is the budget's
    (runtime,) = plan(tmp_path, [TOY], [0], variants=["QKV"], preset="tiny",
                      overrides=base + ["optim.lr=0.1", "train.log_every=3"])
    assert runtime.is_current()


def test_bad_summaries_count_as_unfinished_with_a_note(tmp_path, capsys):
    run = _trained_cell(tmp_path, ["train.tensorboard=false", "train.steps=4"])
    for content, problem in [("[1, 2]", "holds a list"), ("{}", "has no status"), ("{", "is not valid JSON"),
                             ('{"status": "done", "final": 3}', "malformed 'final'")]:
        (run.run_dir / "summary.json").write_text(content)
        assert problem in summary_problem(run.run_dir) and read_summary(run.run_dir) is None
        assert run_status(run.run_dir) == "partial"
    results = run_sweep([run], threads=1, progress=False, command=[sys.executable, "-c", "pass"])
    assert "summary.json has a malformed 'final' entry; treating the run as not finished" in capsys.readouterr().err
    assert results[0].status == "failed"  # relaunched (a no-op here), not skipped and no crash
    train(load_config(None, run.train_args()), task=ToyTask())  # resuming writes the summary again
    assert read_summary(run.run_dir)["status"] == "done"


# --- overrides set each field once ----------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["variant=QKV", "model.variant=Q-K=V"], "override 'model.variant=Q-K=V' sets 'variant' again"),
    (["train.steps=5", "train.steps=5"], "sets 'train.steps' again (already set by 'train.steps=5')"),
    (["optim={lr: 1}", "optim.lr=2"], "override 'optim.lr=2' sets 'optim.lr' again"),
    (["train.steps="], "override 'train.steps=' has no value for 'train.steps'"),
    (["seed= "], "has no value for 'seed'"),
    (["train.eval_batches=some"], "train.eval_batches must be a positive integer, 'all' or null"),
])
def test_overrides_are_given_once_and_with_a_value(overrides, message):
    with pytest.raises(QkvlabError, match=message.replace("(", r"\(").replace(")", r"\)").replace("{", r"\{")):
        load_config(None, ["task=toy", *overrides])


def test_model_variant_is_the_variant(tmp_path):
    assert load_config(None, ["task=toy", "model.variant=tied-kv"]).variant == "Q-K=V"
    assert load_config(None, ["task=toy", "model.variant=tied-kv"]).model == {}
    path = tmp_path / "run.yaml"
    path.write_text("task: toy\nvariant: QKV\nmodel: {variant: Q-K=V}\n")
    with pytest.raises(QkvlabError, match="model.variant 'Q-K=V' disagrees with variant 'QKV'"):
        load_config(path)
    path.write_text("task: toy\nvariant: tied-kv\nmodel: {variant: Q-K=V, n_layers: 1}\n")
    assert load_config(path).model == {"n_layers": 1}


def test_a_warmup_longer_than_the_run_is_clamped_with_a_note():
    run = resolve_run(load_config(None, ["task=toy", "preset=tiny", "train.steps=1"]), ToyTask())
    assert run.config.schedule.warmup_steps == 1
    assert run.notes == ("note: schedule.warmup_steps=2 exceeds train.steps=1; warming up over all 1 steps",)


class _CountingToy(ToyTask):
    seen: list = []

    def evaluate(self, model, batch_size, max_batches=None):
        self.seen.append(max_batches)
        return super().evaluate(model, batch_size, max_batches)


@pytest.mark.parametrize("value, expected", [("all", None), ("3", 3), ("null", 2)])
def test_eval_batches_all_means_the_whole_split(tmp_path, value, expected):
    task = _CountingToy()
    task.seen = []
    train(toy_config(tmp_path / "run", "train.steps=2", f"train.eval_batches={value}"), task=task)
    assert set(task.seen) == {expected}


# --- a run directory as input: continue or extend -----------------------------------------

def test_extending_a_finished_run_from_its_directory(tmp_path, capsys):
    run = tmp_path / "run"
    train(toy_config(run, "train.checkpoint_every=8"), task=ToyTask())
    capsys.readouterr()
    assert main(["train", str(run)]) == 0  # a finished run is left alone
    assert "done:" in capsys.readouterr().out
    assert main(["train", str(run), "train.steps=32"]) == 0
    out = capsys.readouterr().out
    assert f"continuing {run} from step 24 with train.steps 24 -> 32" in out
    summary = read_summary(run)
    assert summary["status"] == "done" and summary["step"] == 32
    assert [s for s, _ in losses(run)] == list(range(1, 33))
    assert load_config(run).train.steps == 32 and load_config(run).train.out_dir == str(run)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))[1]
    assert state["scheduler"]["lr_lambdas"][0]["total"] == 32  # the schedule was recomputed for the new total
    with pytest.raises(QkvlabError, match="below step 32 that .* has reached; a run cannot be shortened"):
        train(load_config(run, ["train.steps=16"]), task=ToyTask())
    with pytest.raises(QkvlabError, match=r"another config \(optim.lr: 0.03 -> 0.5\)"):
        train(load_config(run, ["optim.lr=0.5"]), task=ToyTask())


def test_init_from_a_decoder_on_an_encoder_task_names_both_kinds(tmp_path):
    save_model(build_model(preset("tiny", variant="QKV")), tmp_path / "decoder")
    with pytest.raises(QkvlabError, match="holds a decoder model but task 'toy' trains encoder models"):
        train(toy_config(tmp_path / "run", f"init_from={tmp_path / 'decoder'}"), task=ToyTask())
    assert not (tmp_path / "run").exists()


def test_a_stored_config_is_the_resolved_one(tmp_path):
    train(toy_config(tmp_path / "run", "train.steps=1"), task=ToyTask())
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert stored["schedule"]["warmup_steps"] == 1 and stored["train"]["eval_batches"] == 2
