"""The iso-parameter experiment: are the parameters a tie saves better spent on MLP width?

Each tied variant is trained twice beside QKV: with the task's architecture (the core comparison)
and with its MLP widened until the model's total parameters are within 1 % of QKV's (the nearest
integer width; counted once when tied, on the meta device, so nothing is allocated).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qkvlab.arch import ModelConfig
from qkvlab.errors import check
from qkvlab.experiments.plan import PlannedRun, planned

NAME = "iso-parameter"
TASKS = ("shakespeare-char",)
VARIANTS = ("Q=K-V", "Q-K=V", "Q=K=V", "Q=X")
TOLERANCE = 0.01


def count_params(config: ModelConfig) -> int:
    """Parameters of the model `config` builds (tied tensors once), without allocating memory."""
    import torch

    from qkvlab.models import build_model

    with torch.device("meta"):
        model = build_model(config, seed=0)
    return sum(p.numel() for p in model.parameters())


def iso_d_mlp(baseline: ModelConfig, variant: str) -> int:
    """The MLP width that gives `variant` the parameter count of `baseline` (within 1 %)."""
    target = count_params(baseline)
    tied = baseline.replace(variant=variant)
    d0 = tied.d_mlp or 4 * tied.d_model
    p0, p1 = count_params(tied.replace(d_mlp=d0)), count_params(tied.replace(d_mlp=d0 + 1))
    per_unit = p1 - p0  # an MLP unit: its input row, output column and bias (SwiGLU: two input rows)
    d_mlp = max(1, d0 + round((target - p0) / per_unit))
    total = count_params(tied.replace(d_mlp=d_mlp))
    check(abs(total - target) <= TOLERANCE * target,
          f"{variant}: no MLP width brings {total:,} parameters within 1 % of {target:,}")
    return d_mlp


def arm(kind: str) -> str:
    return kind  # "same architecture" | "iso-parameter"


def plan(root: Path, seeds: Sequence[int], preset: str = "quick", tasks: Sequence[str] | None = None,
         variants: Sequence[str] | None = None, overrides: Sequence[str] = ()) -> list[PlannedRun]:
    """QKV and each tied variant at the task's size ("same architecture"), and each tied variant
    with the MLP width that matches QKV's parameters ("iso-parameter")."""
    from qkvlab.train.runs import load_task

    runs: list[PlannedRun] = []
    names = list(variants or VARIANTS)
    for task_name in tasks or TASKS:
        baseline = load_task(task_name).model_config("QKV", preset)
        runs += planned(root, NAME, arm("same architecture"), [task_name], ["QKV", *names], seeds, preset,
                        overrides)
        for variant in names:
            width = iso_d_mlp(baseline, variant)
            runs += planned(root, NAME, arm("iso-parameter"), [task_name], [variant], seeds, preset,
                            [*overrides, f"model.d_mlp={width}"])
    return runs
