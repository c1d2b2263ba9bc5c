"""The study: the training experiments planned together, trained in one sweep, reported together.

`qkvlab reproduce --preset study` and `qkvlab experiment NAME` both come here. Runs that two
experiments share (the native context of the context-length experiment, the middle size of the
scale experiment, the same-architecture arm of the iso-parameter experiment are all core runs)
are trained once.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qkvlab.experiments import context_length, core, iso_parameter, positions, scale
from qkvlab.experiments.plan import PlannedRun, share_runs, train_all
from qkvlab.train.sweep import SweepResult, available_cores, check_data, visible_gpus

PLANNERS: dict[str, Callable[..., list[PlannedRun]]] = {
    core.NAME: core.plan,
    context_length.NAME: context_length.plan,
    scale.NAME: scale.plan,
    iso_parameter.NAME: iso_parameter.plan,
    positions.NAME: positions.plan,  # not in STUDY: an extension (`qkvlab experiment positions`)
}
STUDY = (core.NAME, context_length.NAME, scale.NAME, iso_parameter.NAME)


@dataclass
class StudyResult:
    root: Path
    report: Path | None
    results: list[SweepResult] = field(default_factory=list)

    @property
    def failed(self) -> list[SweepResult]:
        return [r for r in self.results if r.status == "failed"]


def plan_study(root: Path, seeds: Sequence[int], experiments: Sequence[str] = STUDY, preset: str = "quick",
               overrides: Sequence[str] = (), options: dict[str, dict] | None = None) -> list[PlannedRun]:
    """Every run of `experiments` (options per experiment: tasks, variants, contexts, sizes)."""
    runs: list[PlannedRun] = []
    for name in (e for e in experiments if e in PLANNERS):  # "analysis" trains nothing
        runs += PLANNERS[name](root, seeds, preset, overrides=overrides, **(options or {}).get(name, {}))
    return share_runs(runs)


def run_study(out: str | Path, seeds: Sequence[int], experiments: Sequence[str] = STUDY, preset: str = "quick",
              jobs: int | None = None, overrides: Sequence[str] = (), options: dict[str, dict] | None = None,
              command: Sequence[str] = (), progress: bool = True) -> StudyResult:
    """Train every run of the experiments into `out` (finished runs are skipped), then write the report."""
    from qkvlab.experiments.summary import write_study_report

    started = time.perf_counter()
    root = Path(out)
    runs = plan_study(root, seeds, experiments, preset, overrides, options)
    check_data(sorted({p.run.task for p in runs}), list(overrides))
    n_unique = len({p.run.run_dir for p in runs})
    jobs = jobs or min(len(visible_gpus()) or available_cores(), n_unique)
    meta = {"experiments": list(experiments), "seeds": list(seeds), "preset": preset,
            "command": shlex.join(command) if command else None}
    results = train_all(root, runs, jobs, meta, progress=progress)
    report = write_study_report(root, wall_s=time.perf_counter() - started,
                                command=shlex.join(command) if command else None)
    return StudyResult(root, report, results)


def reproduce_study(out: str | Path, seeds: Sequence[int] | None = None, jobs: int | None = None,
                    tasks: Sequence[str] | None = None, overrides: Sequence[str] = (), progress: bool = True):
    """`qkvlab reproduce --preset study`: every experiment and the analysis, three seeds by default."""
    from qkvlab.train.report import aggregate, collect, summary_table
    from qkvlab.train.reproduce import Reproduction, get_preset

    spec = get_preset("study")
    seeds = list(seeds or spec.seeds)
    root = Path(out)
    command = ["qkvlab", "reproduce", "--preset", "study", "--out", str(root), "--seeds", ",".join(map(str, seeds)),
               *(["--jobs", str(jobs)] if jobs else []), *(["--tasks", ",".join(tasks)] if tasks else []), *overrides]
    options = {core.NAME: {"tasks": list(tasks)}} if tasks else None
    result = run_study(root, seeds, experiments=[*STUDY, "analysis"], preset=spec.task_preset, jobs=jobs,
                       overrides=overrides, options=options, command=command, progress=progress)
    core_dir = root / core.NAME
    table = summary_table(aggregate(collect(core_dir))) if core_dir.is_dir() and collect(core_dir) else ""
    return Reproduction(report=result.report or root, table=table, results=result.results)
