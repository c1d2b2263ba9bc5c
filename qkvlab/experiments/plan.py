"""What the training experiments share: planned runs with their arm, one sweep, one `plan.json`.

An experiment (core, context-length, scale, iso-parameter) is a list of `PlannedRun`s: a sweep run
(task, variant, seed, overrides) and the *arm* it belongs to (e.g. "context 128"). Runs whose
training arguments are identical are trained once, even across experiments (the context-length
experiment's native-context arm is the core experiment's language model). `plan.json` records
every planned run and its directory, so reports can be rebuilt from it at any time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from qkvlab.atomic import atomic_write_text
from qkvlab.errors import QkvlabError, check
from qkvlab.train.runs import run_dir_for
from qkvlab.train.sweep import SweepResult, SweepRun, check_overrides, run_sweep

PLAN = "plan.json"


@dataclass(frozen=True)
class PlannedRun:
    experiment: str
    arm: str  # the setting this run belongs to within its experiment ("" for the core)
    run: SweepRun

    def key(self) -> tuple:
        """Identity of the training itself (what `qkvlab train` receives, minus the directory)."""
        r = self.run
        return r.task, r.variant, r.seed, r.preset, r.config, tuple(sorted(r.overrides))

    def to_dict(self) -> dict:
        r = self.run
        return {"experiment": self.experiment, "arm": self.arm, "task": r.task, "variant": r.variant,
                "seed": r.seed, "preset": r.preset, "overrides": list(r.overrides), "run_dir": str(r.run_dir)}

    @classmethod
    def from_dict(cls, d: dict) -> PlannedRun:
        run = SweepRun(task=d["task"], variant=d["variant"], seed=int(d["seed"]), run_dir=Path(d["run_dir"]),
                       preset=d["preset"], overrides=tuple(d["overrides"]))
        return cls(d["experiment"], d["arm"], run)


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def planned(root: Path, experiment: str, arm: str, tasks: Sequence[str], variants: Sequence[str],
            seeds: Sequence[int], preset: str, overrides: Sequence[str] = ()) -> list[PlannedRun]:
    """tasks x variants x seeds in ``root/<experiment>/<arm>/<task>/<variant>/seedN``."""
    check_overrides(list(overrides))
    base = root / slug(experiment) / (slug(arm) if arm else "")
    return [PlannedRun(experiment, arm, SweepRun(task=task, variant=variant, seed=seed,
                                                 run_dir=run_dir_for(base, task, variant, seed),
                                                 preset=preset, overrides=tuple(overrides)))
            for task in tasks for variant in variants for seed in seeds]


def share_runs(runs: list[PlannedRun]) -> list[PlannedRun]:
    """Point runs that train exactly the same thing at the first one's directory."""
    first: dict[tuple, Path] = {}
    out = []
    for p in runs:
        run_dir = first.setdefault(p.key(), p.run.run_dir)
        out.append(replace(p, run=replace(p.run, run_dir=run_dir)))
    return out


def unique_runs(runs: list[PlannedRun]) -> list[SweepRun]:
    seen: dict[Path, SweepRun] = {}
    for p in runs:
        seen.setdefault(p.run.run_dir, p.run)
    return list(seen.values())


def write_plan(root: Path, runs: list[PlannedRun], meta: dict) -> None:
    """`plan.json`: the planned runs; a directory planned for something else is refused."""
    path = root / PLAN
    if path.exists():
        try:
            old = {d["run_dir"]: PlannedRun.from_dict(d).key() for d in json.loads(path.read_text())["runs"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise QkvlabError(f"{path} is not a readable experiment plan ({exc}); choose another --out") from None
        for p in runs:
            if old.get(str(p.run.run_dir), p.key()) != p.key():
                raise QkvlabError(f"{p.run.run_dir} was planned for a different run in {path}; "
                                  f"use another --out (or remove that directory yourself)")
        merged = {d["run_dir"] + "|" + d["experiment"] + "|" + d["arm"]: d
                  for d in json.loads(path.read_text())["runs"]}
    else:
        merged = {}
    for p in runs:
        d = p.to_dict()
        merged[d["run_dir"] + "|" + d["experiment"] + "|" + d["arm"]] = d
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({**meta, "runs": list(merged.values())}, indent=1) + "\n")


def read_plan(root: Path) -> list[PlannedRun]:
    path = Path(root) / PLAN
    check(path.is_file(), f"{str(root)!r} holds no {PLAN}: it is not an experiment directory")
    try:
        return [PlannedRun.from_dict(d) for d in json.loads(path.read_text())["runs"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise QkvlabError(f"{path} is not a readable experiment plan ({exc})") from None


def train_all(root: Path, runs: list[PlannedRun], jobs: int, meta: dict, progress: bool = True) -> list[SweepResult]:
    """Record the plan, then train every run not yet finished (shared runs once)."""
    runs = share_runs(runs)
    for r in unique_runs(runs):
        r.requested_run()  # every config is valid before anything is written
    write_plan(root, runs, meta)
    return run_sweep(unique_runs(runs), jobs=jobs, progress=progress)
