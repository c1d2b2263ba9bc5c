"""Bad input to `qkvlab train`, `sweep` and `reproduce`: exit code 2, one line naming the bad value, no
traceback, and no file changed outside the case's own working directory (which stays empty)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))  # toy_task, trainkit

from toy_task import ToyTask  # noqa: E402
from trainkit import toy_config  # noqa: E402

from qkvlab.cli.main import main  # noqa: E402
from qkvlab.models import build_model  # noqa: E402
from qkvlab.models.config import preset  # noqa: E402
from qkvlab.models.io import save_model  # noqa: E402
from qkvlab.train.lock import DirLock  # noqa: E402
from qkvlab.train.trainer import train  # noqa: E402

TOY = ["task=toy_task:ToyTask", "preset=tiny"]
SWEEP = ["sweep", "--tasks", "toy_task:ToyTask", "--preset", "tiny"]
REPRO = ["reproduce", "--tasks", "toy_task:ToyTask", "--preset", "tiny"]

# (argv with {inputs} for the shared input directory, text the one-line message must contain)
CASES = [
    # train: config files and names
    (["train", "{inputs}/missing.yaml"], "missing.yaml' does not exist"),
    (["train", "nosuchconfig"], "'nosuchconfig' is neither a file nor a packaged config"),
    (["train", "lm-300"], "did you mean the packaged config 'lm-300m'"),
    (["train", "{inputs}/bad.yaml"], "bad.yaml' is not valid YAML"),
    (["train", "{inputs}/list.yaml"], "list.yaml' must hold a mapping"),
    (["train", "{inputs}/typo.yaml"], "'schedule.warmup'; did you mean 'schedule.warmup_steps'"),
    (["train", "{inputs}/disagree.yaml"], "model.variant 'Q-K=V' disagrees with variant 'QKV'"),
    (["train", "{inputs}/binary.yaml"], "binary.yaml' cannot be read"),
    (["train"], "give a config file"),
    (["train", *TOY, "stray"], "'stray' is not a KEY=VALUE override"),
    # train: keys and values
    (["train", *TOY, "optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["train", *TOY, "train.steps="], "'train.steps=' has no value"),
    (["train", *TOY, "seed="], "'seed=' has no value"),
    (["train", *TOY, "data_dir= "], "'data_dir= ' has no value"),
    (["train", *TOY, "train.steps=abc"], "'train.steps' must be a number, got 'abc'"),
    (["train", *TOY, "train.steps=0"], "train.steps must be positive, got 0"),
    (["train", *TOY, "train.steps=-5"], "got -5"),
    (["train", *TOY, "train.steps=2.5"], "must be an integer, got 2.5"),
    (["train", *TOY, "train.steps=1e400"], "'train.steps' must be a finite number"),
    (["train", *TOY, "optim.lr=fast"], "'optim.lr' must be a number, got 'fast'"),
    (["train", *TOY, "optim.lr=-1"], "optim.lr must be positive, got -1"),
    (["train", *TOY, "optim.betas=[0.9]"], "'optim.betas' must be a list of 2 values"),
    (["train", *TOY, "optim.betas=[0.9, 1.5]"], "got [0.9, 1.5]"),
    (["train", *TOY, "variant=QXV"], "unknown variant 'QXV'"),
    (["train", *TOY, "seed=-1"], "seed must be a non-negative integer, got -1"),
    (["train", *TOY, "train.device=tpu"], "train.device 'tpu'"),
    (["train", *TOY, "distributed.strategy=zero"], "distributed.strategy 'zero'"),
    (["train", *TOY, "schedule.kind=linear"], "schedule.kind 'linear'"),
    (["train", *TOY, "schedule.min_lr_ratio=2"], "schedule.min_lr_ratio must be in [0, 1], got 2"),
    (["train", *TOY, "train.eval_batches=some"], "got 'some'"),
    (["train", *TOY, "train.progress=maybe"], "'train.progress' must be true or false, got 'maybe'"),
    (["train", *TOY, "optim=3"], "config section 'optim' must be a mapping, got 3"),
    (["train", *TOY, "model.n_layer=2"], "'model.n_layer'; did you mean 'model.n_layers'"),
    # train: the same field twice
    (["train", *TOY, "variant=QKV", "model.variant=Q-K=V"], "'model.variant=Q-K=V' sets 'variant' again"),
    (["train", *TOY, "train.steps=5", "train.steps=6"], "'train.steps=6' sets 'train.steps' again"),
    (["train", *TOY, "optim={lr: 1}", "optim.lr=2"], "'optim.lr=2' sets 'optim.lr' again"),
    (["train", "{inputs}/run.yaml", "seed=1", "seed=2"], "'seed=2' sets 'seed' again"),
    # train: tasks, presets, models
    (["train", "task=nosuchtask"], "unknown task 'nosuchtask'"),
    (["train", "task=nosuch.module:Cls"], "task 'nosuch.module:Cls' cannot be imported"),
    (["train", "task=toy_task:ToyTask", "preset=huge"], "no budget for preset 'huge'"),
    (["train", *TOY, "train.grad_accum=3"], "train.batch_size=8 must be divisible"),
    (["train", *TOY, "init_from={inputs}/decoder"], "holds a decoder model but task 'toy' trains encoder models"),
    (["train", *TOY, "init_from={inputs}/nothing-here"], "nothing-here"),
    (["train", *TOY, "model_preset=nosuch"], "nosuch"),
    (["train", *TOY, "model_preset=tiny", "init_from={inputs}/decoder"], "set model_preset or init_from, not both"),
    # train: run directories
    (["train", "{inputs}/finished", "optim.lr=0.5"], "another config (optim.lr: 0.03 -> 0.5)"),
    (["train", "{inputs}/finished", "train.steps=4"], "train.steps=4 is below step 6"),
    (["train", "{inputs}/finished", "variant=Q-K=V", "model.variant=QKV"], "sets 'variant' again"),
    (["train", "{inputs}/empty-dir"], "empty-dir' is a directory but not a run directory"),
    (["train", *TOY, "train.out_dir={inputs}/locked"], "locked' is in use by another qkvlab process (pid"),
    (["train", "{inputs}/locked"], "locked' is in use by another qkvlab process"),
    (["train", *TOY, "train.out_dir={inputs}/a-file"], "a-file' is an existing file, not a directory"),
    # sweep: options
    ([*SWEEP, "--out", "out", "--jobs", "0"], "--jobs must be at least 1, got 0"),
    ([*SWEEP, "--out", "out", "--jobs", "-2"], "got -2"),
    ([*SWEEP, "--out", "out", "--jobs", "abc"], "invalid int value: 'abc'"),
    ([*SWEEP, "--out", "out", "--threads", "0"], "--threads must be at least 1, got 0"),
    ([*SWEEP, "--out", "out", "--seeds", "a-b"], "--seeds 'a-b' is not a non-negative seed"),
    ([*SWEEP, "--out", "out", "--seeds", ""], "--seeds '' gives no seed"),
    ([*SWEEP, "--out", "out", "--seeds", "-1"], "--seeds '-1'"),
    ([*SWEEP, "--out", "out", "--seeds", "3-1"], "--seeds range '3-1' is empty"),
    ([*SWEEP, "--out", "out", "--seeds", "0-99999999"], "'0-99999999' asks for more than"),
    ([*SWEEP, "--out", "out", "--seeds", "1.5"], "--seeds '1.5'"),
    ([*SWEEP, "--out", ""], "--out '' is empty"),
    ([*SWEEP, "--out", "{inputs}/a-file"], "a-file' is an existing file"),
    ([*SWEEP, "--out", "out", "--variants", "QXV"], "unknown variant 'QXV'"),
    ([*SWEEP, "--out", "out", "--config", "{inputs}/missing.yaml"], "missing.yaml' does not exist"),
    (["sweep", "--out", "out", "--tasks", "nosuchtask"], "unknown task 'nosuchtask'"),
    (["sweep", "--out", "out", "--suite", "nope"], "unknown suite 'nope'"),
    (["sweep", "--out", "out", "--tasks", "toy_task:ToyTask", "--preset", "huge"], "preset 'huge'"),
    # sweep: overrides
    ([*SWEEP, "--out", "out", "variant=QKV"], "a sweep sets variant for each run itself; use --variants"),
    ([*SWEEP, "--out", "out", "model.variant=QKV"], "use --variants"),
    ([*SWEEP, "--out", "out", "train.out_dir=x"], "use --out"),
    ([*SWEEP, "--out", "out", "optim.lr=abc"], "'optim.lr' must be a number, got 'abc'"),
    ([*SWEEP, "--out", "out", "train.steps="], "'train.steps=' has no value"),
    ([*SWEEP, "--out", "out", "optim.lr=1", "optim.lr=2"], "'optim.lr=2' sets 'optim.lr' again"),
    ([*SWEEP, "--out", "out", "oops"], "'oops' is not a KEY=VALUE override"),
    ([*SWEEP, "--out", "{inputs}/locked"], "sweep directory '{inputs}/locked' is in use"),
    # reproduce
    ([*REPRO, "--out", "out", "--jobs", "0"], "--jobs must be at least 1, got 0"),
    ([*REPRO, "--out", "out", "--seeds", "x"], "--seeds 'x'"),
    ([*REPRO, "--out", "out", "--seeds", "5-2"], "'5-2' is empty"),
    (["reproduce", "--preset", "huge", "--out", "out"], "unknown reproduce preset 'huge'"),
    (["reproduce", "--tasks", "nosuchtask", "--out", "out"], "unknown task 'nosuchtask'"),
    (["reproduce", "--tasks", ",", "--out", "out"], "--tasks ',' names no task"),
    ([*REPRO, "--out", "out", "train.steps="], "'train.steps=' has no value"),
    ([*REPRO, "--out", "out", "seed=3"], "use --seeds"),
    ([*REPRO, "--out", "{inputs}/a-file"], "a-file' is an existing file"),
    ([*REPRO, "--out", "{inputs}/locked"], "reproduce directory '{inputs}/locked' is in use"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Inputs the cases read: configs, a finished run, a decoder export, a run directory locked by us."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "bad.yaml").write_text("task: [unclosed\n")
    (root / "list.yaml").write_text("- task\n")
    (root / "typo.yaml").write_text("task: toy\nschedule:\n  warmup: 3\n")
    (root / "disagree.yaml").write_text("task: toy\nvariant: QKV\nmodel: {variant: Q-K=V}\n")
    (root / "binary.yaml").write_bytes(b"task: \xff\xfe\x00\n")
    (root / "run.yaml").write_text("task: toy_task:ToyTask\npreset: tiny\n")
    (root / "a-file").write_text("not a directory\n")
    (root / "empty-dir").mkdir()
    train(toy_config(root / "finished", "train.steps=6"), task=ToyTask())
    save_model(build_model(preset("tiny", variant="QKV")), root / "decoder")
    train(toy_config(root / "locked", "train.steps=2"), task=ToyTask())
    with DirLock(root / "locked"):
        yield root


def _checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_is_one_line_and_changes_nothing(argv, message, inputs, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # relative outputs (runs/..., out) would land here
    before = _checksums(inputs)
    argv = [a.replace("{inputs}", str(inputs)) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert len(lines) == 1 and "error: " in lines[0], captured.err
    assert message.replace("{inputs}", str(inputs)) in lines[0]
    assert _checksums(inputs) == before
    assert list(work.iterdir()) == []


def test_there_are_enough_cases():
    assert len(CASES) >= 45
