"""Shared helpers of the training tests: toy run configs, subprocess environments, weight comparison."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from qkvlab.train.checkpoint import latest_checkpoint, load_weights
from qkvlab.train.config import RunConfig, load_config
from qkvlab.train.metrics import read_metrics

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TOY = "toy_task:ToyTask"


def toy_config(out_dir: Path, *overrides: str, task: str = TOY) -> RunConfig:
    """The toy task's tiny run, single-threaded and quiet, in float32 (equalities exact on every CPU), writing to
    `out_dir`."""
    base = [f"task={task}", "preset=tiny", f"train.out_dir={out_dir}", "train.threads=1", "train.progress=false",
            "train.tensorboard=false"]
    if not any(o.startswith("train.dtype=") for o in overrides):
        base.append("train.dtype=float32")
    return load_config(None, base + list(overrides))


def subprocess_env() -> dict[str, str]:
    """Environment for `python -m qkvlab ...` children: the toy tasks importable, one thread each."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def qkvlab_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "qkvlab", *args]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_weights(latest_checkpoint(run_dir) / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl", "train")]
