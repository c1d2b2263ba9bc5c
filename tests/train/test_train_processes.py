"""Training as separate processes: a SIGKILLed run resumes to the same weights; 2-process DDP/FSDP (gloo)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from toy_task import ToyTask
from trainkit import HERE, assert_same_weights, final_weights, losses, qkvlab_cmd, subprocess_env, toy_config

from qkvlab.train.checkpoint import list_checkpoints
from qkvlab.train.runs import read_summary
from qkvlab.train.trainer import train

SLOW = ["task=toy_task:SlowToyTask", "preset=tiny", "train.steps=40", "train.checkpoint_every=5",
        "train.eval_every=20", "train.threads=1", "train.progress=false", "train.tensorboard=false"]


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_weights(tmp_path):
    env = subprocess_env()
    whole = subprocess.Popen(qkvlab_cmd("train", *SLOW, f"train.out_dir={tmp_path / 'whole'}"), env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    victim = subprocess.Popen(qkvlab_cmd("train", *SLOW, f"train.out_dir={tmp_path / 'killed'}"), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list_checkpoints(tmp_path / "killed") and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    steps = [s for s, _ in list_checkpoints(tmp_path / "killed")]
    assert steps and max(steps) < 40 and read_summary(tmp_path / "killed") is None, "the run was not killed mid-way"
    resumed = subprocess.run(qkvlab_cmd("train", *SLOW, f"train.out_dir={tmp_path / 'killed'}"), env=env,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed {tmp_path / 'killed'} at step {max(steps)}" in resumed.stdout
    out, _ = whole.communicate(timeout=120)
    assert whole.returncode == 0, out
    assert_same_weights(final_weights(tmp_path / "killed"), final_weights(tmp_path / "whole"))
    assert losses(tmp_path / "killed") == losses(tmp_path / "whole")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_follow_one_process_on_the_same_global_batch(tmp_path, strategy):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    overrides = ["model.dropout=0", "train.grad_accum=2", "train.dtype=float32"]
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "qkvlab", "train", "task=toy_task:ToyTask",
           "preset=tiny", "train.progress=false", "train.tensorboard=false", "train.device=cpu",
           f"distributed.strategy={strategy}", "distributed.backend=gloo", f"train.out_dir={tmp_path / 'two'}",
           *overrides]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=150, cwd=HERE)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    train(toy_config(tmp_path / "one", *overrides), task=ToyTask())
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert [s for s, _ in two] == [s for s, _ in one] == list(range(1, 25))
    assert [x for _, x in two] == pytest.approx([x for _, x in one], rel=1e-5)
    assert read_summary(tmp_path / "two")["world_size"] == 2
    wa, wb = final_weights(tmp_path / "two"), final_weights(tmp_path / "one")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert (wa[name] - wb[name]).abs().max() < 1e-4, name


@pytest.mark.slow
def test_two_processes_train_a_language_model_through_the_chunked_loss(tmp_path):
    """The language tasks' loss (`GPT(x, targets=y)`, qkvlab.nn.cross_entropy) under DDP: the two processes'
    losses and weights follow one process's."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    overrides = ["train.steps=6", "train.eval_batches=2", "train.dtype=float32"]
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "qkvlab", "train", "task=shakespeare-char",
           "preset=tiny", "train.progress=false", "train.tensorboard=false", "train.device=cpu", "train.threads=1",
           "distributed.strategy=ddp", "distributed.backend=gloo", f"train.out_dir={tmp_path / 'two'}", *overrides]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=150, cwd=HERE)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    train(toy_config(tmp_path / "one", *overrides, task="shakespeare-char"))
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert [s for s, _ in two] == [s for s, _ in one] == list(range(1, 7))
    assert [x for _, x in two] == pytest.approx([x for _, x in one], rel=1e-5)
    wa, wb = final_weights(tmp_path / "two"), final_weights(tmp_path / "one")
    for name in wa:
        assert (wa[name] - wb[name]).abs().max() < 1e-4, name
