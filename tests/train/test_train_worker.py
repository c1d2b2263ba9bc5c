"""Sweep workers (qkvlab.cli.worker): a run trained in a worker after other runs equals a fresh
`qkvlab train` of it; a worker that dies fails only its run; a bad run is reported and the worker goes on."""

from __future__ import annotations

import subprocess

import pytest
from trainkit import assert_same_weights, final_weights, qkvlab_cmd, subprocess_env

from qkvlab.train.runs import read_summary
from qkvlab.train.sweep import LOG, plan, run_sweep

TINY = ["train.tensorboard=false", "train.steps=6", "train.eval_every=3"]


@pytest.mark.slow
def test_a_run_in_a_worker_equals_a_fresh_process(tmp_path):
    # one worker: the Q-K=V run comes after a QKV run of another seed and a different task
    runs = (plan(tmp_path / "sweep", ["toy_task:SlowToyTask"], [1], variants=["QKV"], preset="tiny", overrides=TINY)
            + plan(tmp_path / "sweep", ["toy_task:ToyTask"], [0], variants=["Q-K=V"], preset="tiny", overrides=TINY))
    results = run_sweep(runs, jobs=1, threads=1, progress=False, env=subprocess_env())
    assert [r.status for r in results] == ["done", "done"], [r.message for r in results]
    alone = tmp_path / "alone"
    subprocess.run(qkvlab_cmd("train", "task=toy_task:ToyTask", "variant=Q-K=V", "seed=0", "preset=tiny",
                              f"train.out_dir={alone}", "train.progress=false", "train.threads=1", *TINY),
                   env=subprocess_env(), check=True, capture_output=True)
    in_worker = runs[1].run_dir
    assert_same_weights(final_weights(in_worker), final_weights(alone))
    assert read_summary(in_worker)["final"] == read_summary(alone)["final"]
    log = (in_worker / LOG).read_text()
    assert log.startswith("$ qkvlab train task=toy_task:ToyTask variant=Q-K=V") and "done: toy Q-K=V seed 0" in log


@pytest.mark.slow
def test_a_dying_worker_fails_only_its_run(tmp_path):
    runs = (plan(tmp_path, ["toy_task:CrashingToyTask"], [0], variants=["QKV"], preset="tiny", overrides=TINY)
            + plan(tmp_path, ["toy_task:ToyTask"], [0], variants=["Q-K=V"], preset="tiny", overrides=TINY))
    crashed, after = run_sweep(runs, jobs=1, threads=1, progress=False, env=subprocess_env())
    assert crashed.status == "failed" and str(runs[0].run_dir / LOG) in crashed.message
    assert "the worker process training this run exited with code 9" in crashed.message
    assert after.status == "done", after.message  # a new worker took the next run


@pytest.mark.slow
def test_a_run_that_errors_is_reported_and_the_worker_goes_on(tmp_path):
    runs = (plan(tmp_path, ["toy_task:NanToyTask"], [0], variants=["QKV"], preset="tiny", overrides=TINY[:1]
                 + ["train.steps=10"])
            + plan(tmp_path, ["toy_task:ToyTask"], [0], variants=["Q-K=V"], preset="tiny", overrides=TINY))
    diverged, after = run_sweep(runs, jobs=1, threads=1, progress=False, env=subprocess_env())
    assert diverged.status == "diverged"
    assert "qkvlab: error:" in (runs[0].run_dir / LOG).read_text()  # the run's one-line error, in its log
    assert after.status == "done", after.message
