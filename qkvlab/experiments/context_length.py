"""The context-length experiment: the K=V gap at three context lengths, everything else fixed.

A language model is trained at each context length with the same number of tokens per step (the
batch shrinks as the context grows) and the same steps, learning rate and model; each arm is
evaluated on the whole validation text in windows of its own length. The paper: the Q-K=V gap
shrinks from about 5.4 % at 512 tokens to 2.2 % at 2,048.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qkvlab.errors import check
from qkvlab.experiments.plan import PlannedRun, planned

NAME = "context-length"
TASK = "shakespeare-char"
VARIANTS = ("QKV", "Q-K=V")  # Q-MQA too with --variants (not in the study by default: time)
CONTEXTS = (32, 64, 128)  # a 4x span around the quick model's 64, as 512 -> 2,048 in the paper


def arm(context: int) -> str:
    return f"context {context}"


def plan(root: Path, seeds: Sequence[int], preset: str = "quick", tasks: Sequence[str] | None = None,
         variants: Sequence[str] | None = None, overrides: Sequence[str] = (),
         contexts: Sequence[int] = CONTEXTS) -> list[PlannedRun]:
    from qkvlab.train.runs import load_task

    runs: list[PlannedRun] = []
    for task_name in tasks or [TASK]:
        task = load_task(task_name)
        check(task.family == "lm", f"the context-length experiment needs a language-modelling task, "
                                   f"got {task_name!r} ({task.family})")
        native = task.model_config("QKV", preset).max_seq_len
        tokens = task.budget(preset).batch_size * native  # tokens per step, kept for every context
        for context in contexts:
            check(context >= 2 and tokens % context == 0,
                  f"context {context} must be at least 2 and divide the {tokens} tokens per step of "
                  f"{task_name!r} at {preset}")
            extra = [] if context == native else [f"model.max_seq_len={context}",
                                                   f"train.batch_size={tokens // context}"]
            runs += planned(root, NAME, arm(context), [task_name], list(variants or VARIANTS), seeds, preset,
                            [*overrides, *extra])
    return runs
