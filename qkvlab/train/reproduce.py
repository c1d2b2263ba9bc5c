"""`qkvlab reproduce`: the study end to end, a sweep of every variant over a suite, then the report.

Presets: "study" (three seeds of the study's experiments, `qkvlab.experiments.study`), "quick" (one
seed of each suite task at the tasks' quick budgets, the five projection forms everywhere and head
sharing on language modelling, aimed at two CPU cores and fifteen minutes; measured: 11.0 in bf16
autocast, 12.7-16.6 in float32) and
"full" (three seeds, the tasks' full models and budgets, for a machine with GPUs: one run per GPU at
a time). A rerun skips finished runs and resumes interrupted ones. """

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qkvlab.errors import QkvlabError, check
from qkvlab.train.report import aggregate, collect, summary_table, write_report
from qkvlab.train.sweep import SweepResult, available_cores, check_data, plan, run_sweep, visible_gpus


@dataclass(frozen=True)
class ReproducePreset:
    """What one preset runs: a task suite, the tasks' budget preset, seeds, default parallelism."""

    name: str
    suite: str
    task_preset: str
    seeds: tuple[int, ...]
    jobs: int | None  # None: one process per CUDA device, else per CPU core
    plus: bool = True  # also the "+" (pair-bias) variants where the task is not causal

    def default_out(self) -> Path:
        return Path("runs") / f"reproduce-{self.name}"


PRESETS: dict[str, ReproducePreset] = {
    "quick": ReproducePreset("quick", suite="quick", task_preset="quick", seeds=(0,), jobs=None, plus=False),
    "full": ReproducePreset("full", suite="full", task_preset="full", seeds=(0, 1, 2), jobs=None),
    "tiny": ReproducePreset("tiny", suite="tiny", task_preset="tiny", seeds=(0,), jobs=None),
    # the study's experiments (qkvlab.experiments.study) at the tasks' quick recipes, three seeds
    "study": ReproducePreset("study", suite="study", task_preset="quick", seeds=(0, 1, 2), jobs=None),
}


def get_preset(name: str) -> ReproducePreset:
    if name not in PRESETS:
        raise QkvlabError(f"unknown reproduce preset {name!r}; accepted: {', '.join(PRESETS)}")
    return PRESETS[name]


def suite_tasks(preset: ReproducePreset, tasks: list[str] | None = None) -> list[str]:
    """The preset's suite, or `tasks` (registered names, or "module:Class" import paths)."""
    from qkvlab.tasks.registry import SUITES, get_task

    if not tasks:
        check(preset.suite in SUITES, f"no task suite {preset.suite!r}; suites: {', '.join(SUITES)}")
        return list(SUITES[preset.suite])
    for task in tasks:
        if ":" not in task:
            get_task(task)  # unknown names raise, listing the accepted ones
    return list(tasks)


def preset_variants(preset: ReproducePreset, task: str) -> list[str]:
    """The variants the preset trains on `task` (the study's list, without "+" where the preset drops it)."""
    from qkvlab.tasks.registry import variants_for
    from qkvlab.train.runs import load_task

    return variants_for(load_task(task), plus=preset.plus)


@dataclass
class Reproduction:
    report: Path
    table: str
    results: list[SweepResult]

    @property
    def failed(self) -> list[SweepResult]:
        return [r for r in self.results if r.status == "failed"]


def reproduce(preset: str = "quick", out: str | Path | None = None, seeds: list[int] | None = None,
              jobs: int | None = None, tasks: list[str] | None = None, overrides: Sequence[str] = (),
              progress: bool = True) -> Reproduction:
    """Run the preset's sweep into `out` and write its report."""
    import shlex
    import time

    started = time.perf_counter()
    spec = get_preset(preset)
    root = Path(out) if out is not None else spec.default_out()
    check(spec.suite != "study", "the study preset is qkvlab.experiments.study.reproduce_study "
                                 "(`qkvlab reproduce --preset study`)")
    names = suite_tasks(spec, tasks)
    check_data(names, list(overrides))
    runs = [run for task in names
            for run in plan(root, [task], list(seeds or spec.seeds), variants=preset_variants(spec, task),
                            preset=spec.task_preset, overrides=list(overrides))]
    jobs = jobs or spec.jobs or min(len(visible_gpus()) or available_cores(), len(runs))
    results = run_sweep(runs, jobs=jobs, progress=progress)
    check(collect(root), f"no run of the sweep in {str(root)!r} finished; see the train.log files there")
    command = ["qkvlab", "reproduce", "--preset", preset, "--out", str(root), "--seeds",
               ",".join(map(str, seeds or spec.seeds)), "--jobs", str(jobs),
               *(["--tasks", ",".join(tasks)] if tasks else []), *overrides]
    report = write_report(root, preset=preset, wall_s=time.perf_counter() - started, command=shlex.join(command))
    return Reproduction(report=report, table=summary_table(aggregate(collect(root))), results=results)
