"""The scale experiment: the K=V gap at three model widths, everything else fixed.

Sizes are "LAYERSxD_MODEL" (heads stay the task's, so the head width grows with the model). The
paper: Q-K=V is +3.1 % perplexity at 300M and +2.48 % at 1.2B.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from qkvlab.errors import QkvlabError
from qkvlab.experiments.plan import PlannedRun, planned

NAME = "scale"
TASK = "shakespeare-char"
VARIANTS = ("QKV", "Q-K=V")
SIZES = ("2x64", "2x96", "2x128")  # a 4x span of body parameters, as 300M -> 1.2B in the paper


def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise QkvlabError(f"size {text!r} is not LAYERSxD_MODEL, e.g. 2x128")
    return int(match[1]), int(match[2])


def arm(size: str) -> str:
    layers, d_model = parse_size(size)
    return f"size {layers}x{d_model}"


def plan(root: Path, seeds: Sequence[int], preset: str = "quick", tasks: Sequence[str] | None = None,
         variants: Sequence[str] | None = None, overrides: Sequence[str] = (),
         sizes: Sequence[str] = SIZES) -> list[PlannedRun]:
    from qkvlab.train.runs import load_task

    runs: list[PlannedRun] = []
    for task_name in tasks or [TASK]:
        native = load_task(task_name).model_config("QKV", preset)
        for size in sizes:
            layers, d_model = parse_size(size)
            if d_model % native.n_heads:
                raise QkvlabError(f"size {size}: d_model {d_model} is not a multiple of the task's "
                                  f"{native.n_heads} heads")
            extra = [] if (layers, d_model) == (native.n_layers, native.d_model) else [
                f"model.n_layers={layers}", f"model.d_model={d_model}"]
            runs += planned(root, NAME, arm(size), [task_name], list(variants or VARIANTS), seeds, preset,
                            [*overrides, *extra])
    return runs
