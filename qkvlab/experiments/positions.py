"""The positions experiment: the K=V gap under learned, rotary and rotary-value positions.

The study's language models use learned absolute positions; most models deployed today use rotary ones, and with
K = V a rotary cache is either read with its keys rotated at every step (plain rotary) or stored rotated, when the
values turn by their positions too and each output back by its query's (`rotary_values`, J. Su's VO-RoPE): a
different model, whose decode reads nothing to rotate. Each arm trains the same variants with the task's recipe,
changing only the positions, so the report gives each variant's gap to QKV under every kind of position, and
rotary values against plain rotary for each variant, paired by seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qkvlab.errors import check
from qkvlab.experiments.plan import PlannedRun, planned

NAME = "positions"
TASK = "shakespeare-char"
VARIANTS = ("QKV", "Q-K=V", "Q-MQA")
LEARNED, ROTARY, ROTARY_VALUES = "learned", "rotary", "rotary values"
ARMS: dict[str, tuple[str, ...]] = {  # arm: its overrides
    LEARNED: ("model.positions=learned",),
    ROTARY: ("model.positions=rotary",),
    ROTARY_VALUES: ("model.positions=rotary", "model.rotary_values=true"),
}


def plan(root: Path, seeds: Sequence[int], preset: str = "quick", tasks: Sequence[str] | None = None,
         variants: Sequence[str] | None = None, overrides: Sequence[str] = ()) -> list[PlannedRun]:
    from qkvlab.train.runs import load_task

    runs: list[PlannedRun] = []
    for task_name in tasks or [TASK]:
        task = load_task(task_name)
        check(task.family == "lm", f"the positions experiment needs a language-modelling task, "
                                   f"got {task_name!r} ({task.family})")
        for arm, extra in ARMS.items():  # each arm's positions after the user's overrides: the arm decides them
            runs += planned(root, NAME, arm, [task_name], list(variants or VARIANTS), seeds, preset,
                            [*overrides, *extra])
    return runs
