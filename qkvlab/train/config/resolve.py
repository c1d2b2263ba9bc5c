"""Resolution: a `RunConfig` and its task become a `ResolvedRun`, once, before anything runs.

Resolving fills every `null` budget field from the task's budget for the preset, chooses the
model (the task's, a `model_preset`, or `init_from`'s saved config, with `model` overrides) and
calls `task.setup(model, preset)`. The trainer, the sweep's currency check and the stored run
config (which the report reads) all take the result; nothing downstream resolves again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qkvlab.arch import ModelConfig
from qkvlab.arch import preset as model_preset
from qkvlab.errors import check
from qkvlab.train.config.schema import RunConfig
from qkvlab.train.runs import load_task, run_dir_for

if TYPE_CHECKING:
    from qkvlab.tasks.base import Task


@dataclass(frozen=True)
class ResolvedRun:
    """A run with nothing left to decide.

    `config` has every budget field filled in (what `RUN/config.yaml` stores), `model` is the
    architecture to train, `task` has been set up for it, and `notes` says what resolution
    adjusted (e.g. a warmup clamped to the run's length), for the user.
    """

    config: RunConfig
    model: ModelConfig
    task: Task
    notes: tuple[str, ...] = ()

    @property
    def run_dir(self) -> Path:
        out = self.config.train.out_dir
        assert out is not None  # resolve_run fills it
        return Path(out)


def resolve_run(cfg: RunConfig, task: Task | None = None) -> ResolvedRun:
    """Resolve `cfg` against `task` (default: the task `cfg.task` names, with `cfg.data_dir`)."""
    task = load_task(cfg.task, cfg.data_dir) if task is None else task
    config, notes = _with_budget(cfg, task)
    model = _model(config, task)
    task.setup(model, config.preset)
    return ResolvedRun(config, model, task, notes)


def _with_budget(cfg: RunConfig, task: Task) -> tuple[RunConfig, tuple[str, ...]]:
    """`cfg` with every `null` budget field taken from `task.budget(cfg.preset)` and the default output dir.

    A warmup longer than the run is clamped to the run's steps, with a note. `train.eval_batches`
    may stay null (or "all"): the whole held-out split.
    """
    needed = (cfg.train.steps, cfg.train.batch_size, cfg.optim.lr, cfg.schedule.warmup_steps,
              cfg.train.eval_every, cfg.train.eval_batches)
    budget = task.budget(cfg.preset) if any(v is None for v in needed) else None

    def pick(value, attr):
        return getattr(budget, attr) if value is None else value

    train = cfg.train
    steps = pick(train.steps, "steps")
    eval_every = pick(train.eval_every, "eval_every")
    train = dataclasses.replace(
        train, steps=steps, batch_size=pick(train.batch_size, "batch_size"), eval_every=eval_every,
        eval_batches=pick(train.eval_batches, "eval_batches"),
        checkpoint_every=eval_every if train.checkpoint_every is None else train.checkpoint_every,
        out_dir=train.out_dir or str(run_dir_for("runs", task.name or cfg.task, cfg.variant, cfg.seed)))
    optim = dataclasses.replace(cfg.optim, lr=pick(cfg.optim.lr, "lr"))
    schedule = dataclasses.replace(cfg.schedule, warmup_steps=pick(cfg.schedule.warmup_steps, "warmup_steps"))
    notes: tuple[str, ...] = ()
    if schedule.warmup_steps > steps:
        notes = (f"note: schedule.warmup_steps={schedule.warmup_steps} exceeds train.steps={steps}; "
                 f"warming up over all {steps} steps",)
        schedule = dataclasses.replace(schedule, warmup_steps=steps)
    return cfg.replace(train=train, optim=optim, schedule=schedule), notes


def _model(cfg: RunConfig, task: Task) -> ModelConfig:
    """The run's model: the task's (or `model_preset`'s, or `init_from`'s) config for the variant, with overrides."""
    check(cfg.model_preset is None or cfg.init_from is None, "set model_preset or init_from, not both")
    if cfg.init_from is not None:
        from qkvlab.models.io import saved_model_config

        base = saved_model_config(cfg.init_from)
        check(base.variant == cfg.variant, f"init_from {cfg.init_from!r} holds a {base.variant} model but the run's "
              f"variant is {cfg.variant}; set variant={base.variant}")
        wanted = task.model_config(cfg.variant, cfg.preset).kind
        check(base.kind == wanted, f"init_from {cfg.init_from!r} holds a {base.kind} model but task "
              f"{task.name or cfg.task!r} trains {wanted} models")
    elif cfg.model_preset is not None:
        base = model_preset(cfg.model_preset, variant=cfg.variant)
    else:
        base = task.model_config(cfg.variant, cfg.preset)
        if base.variant != cfg.variant:
            base = base.replace(variant=cfg.variant)
    return base.replace(**cfg.model) if cfg.model else base
