"""Sweeps: every (task, variant, seed) as its own `qkvlab train` process, several at once.

Finished runs (a summary with status done or diverged) are skipped when their stored, resolved
config equals the request resolved the way `qkvlab train` resolves it; interrupted runs resume
from their last checkpoint, because `qkvlab train` always does. Each run writes its output to
``<run_dir>/train.log``; runs end when the sweep process dies (even by `kill -9`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from qkvlab.errors import QkvlabError, check
from qkvlab.train.config import ResolvedRun, differences, load_config, parse_override, resolve_run
from qkvlab.train.lock import PARENT_ENV, child_preexec
from qkvlab.train.runs import (
    CONFIG,
    FINISHED,
    SUMMARY,
    load_task,
    read_summary,
    run_dir_for,
    run_status,
    summary_problem,
)

LOG = "train.log"
# Keys a sweep sets for every run itself (and the option that sets them instead).
SWEEP_KEYS = {"task": "--tasks", "variant": "--variants", "model.variant": "--variants", "seed": "--seeds",
              "preset": "--preset", "train.out_dir": "--out", "train.threads": "--threads",
              "train.progress": None}


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class SweepRun:
    """One cell of a sweep and the `qkvlab train` arguments that produce it."""

    task: str
    variant: str
    seed: int
    run_dir: Path
    preset: str = "quick"
    config: str | None = None  # a base config file
    overrides: tuple[str, ...] = ()

    def train_args(self) -> list[str]:
        base = [self.config] if self.config else []
        return base + [f"task={self.task}", f"variant={self.variant}", f"seed={self.seed}", f"preset={self.preset}",
                       f"train.out_dir={self.run_dir}", "train.progress=false", *self.overrides]

    def requested_run(self) -> ResolvedRun:
        """The run `qkvlab train` resolves from `train_args` (a `QkvlabError` when it is invalid)."""
        return resolve_run(load_config(self.config, self.train_args()))

    def is_current(self) -> bool:
        """Whether the run in `run_dir` was trained with exactly the config this sweep asks for
        (its full resolved config, keys that do not change results aside)."""
        stored_path = self.run_dir / CONFIG
        if not stored_path.is_file():
            return False
        try:
            return not differences(load_config(stored_path), self.requested_run().config)
        except QkvlabError:
            return False


def check_overrides(overrides: list[str]) -> None:
    """Refuse overrides of the keys a sweep sets itself, naming the option to use instead."""
    for text in overrides:
        key = ".".join(parse_override(text)[0])
        if key in SWEEP_KEYS:
            option = SWEEP_KEYS[key]
            instead = f"; use {option}" if option else ""
            raise QkvlabError(f"override {text!r}: a sweep sets {key} for each run itself{instead}")


@dataclass
class SweepResult:
    run: SweepRun
    status: str  # done | diverged | failed | skipped
    seconds: float = 0.0
    message: str = ""
    summary: dict = field(default_factory=dict)


def plan(root: str | Path, tasks: list[str], seeds: list[int], variants: list[str] | None = None,
         preset: str = "quick", config: str | None = None, overrides: Sequence[str] = ()) -> list[SweepRun]:
    """The runs of tasks x variants x seeds (variants default to each task's `variants_for`)."""
    check(len(tasks) > 0, "a sweep needs at least one task")
    check(len(seeds) > 0, "a sweep needs at least one seed")
    check_overrides(list(overrides))
    runs = []
    for task in tasks:
        names = variants if variants else _task_variants(task)
        for variant in names:
            for seed in seeds:
                runs.append(SweepRun(task=task, variant=variant, seed=seed,
                                     run_dir=run_dir_for(root, _task_dir_name(task), variant, seed),
                                     preset=preset, config=config, overrides=tuple(overrides)))
    return runs


def check_data(tasks: list[str], overrides: Sequence[str] = ()) -> None:
    """Refuse to start when registered tasks need datasets that are not fetched (one error, not one per run)."""
    from qkvlab.tasks.registry import missing_data

    data_dir = next((o.partition("=")[2] for o in overrides if o.startswith("data_dir=")), None)
    missing = missing_data([t for t in tasks if ":" not in t], data_dir or None)
    check(not missing, f"the tasks need data that is not fetched yet: {', '.join(missing)}; "
          f"run: qkvlab data fetch {' '.join(missing)}")


def _task_variants(task: str) -> list[str]:
    from qkvlab.tasks.registry import variants_for

    return list(variants_for(load_task(task)))


def _task_dir_name(task: str) -> str:
    """The task's directory: its registered name, or the class's `name` for "module:Class" tasks."""
    if ":" in task:
        return load_task(task).name or task
    return task


def _written_since(path: Path, since: float) -> bool:
    try:
        return path.stat().st_mtime >= since - 1.0
    except OSError:
        return False


def _last_error(log: Path) -> str:
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if line.startswith("qkvlab: error:") or "Error" in line]
    return (errors or lines or ["no output"])[-1]


def _describe(result: SweepResult) -> str:
    run = result.run
    head = f"{result.status:<8} {run.task} {run.variant} seed {run.seed}"
    if result.status in ("done", "skipped") and result.summary:
        metric = result.summary.get("metric", "")
        final = result.summary.get("final")
        value = final.get(metric) if isinstance(final, dict) else None
        shown = f"  {metric} {value:.4g}" if isinstance(value, (int, float)) else ""
        return f"{head}{shown}  ({result.seconds:.1f}s)" if result.status == "done" else f"{head}{shown}"
    return f"{head}: {result.message}"


def visible_gpus() -> list[str]:
    """The CUDA devices a sweep may hand out, one per job slot (CUDA_VISIBLE_DEVICES or all)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


@contextlib.contextmanager
def _sigterm_unwinds():
    """Turn SIGTERM into SystemExit while a sweep runs, so its `finally` stops the runs it started."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class _Launched:
    run: SweepRun
    proc: subprocess.Popen
    started: float
    log: TextIO
    slot: int


def _outcome(job: _Launched) -> SweepResult:
    run, seconds = job.run, time.time() - job.started
    summary = read_summary(run.run_dir) or {}
    fresh = _written_since(run.run_dir / SUMMARY, job.started)
    ok = job.proc.returncode == 0 or (job.proc.returncode == 2 and fresh and summary.get("status") == "diverged")
    if ok and summary.get("status") in FINISHED:
        return SweepResult(run, summary["status"], seconds, summary.get("error", ""), summary)
    return SweepResult(run, "failed", seconds, f"{_last_error(run.run_dir / LOG)} (see {run.run_dir / LOG})")


def run_sweep(runs: list[SweepRun], jobs: int = 1, threads: int | None = None, progress: bool = True,
              env: dict[str, str] | None = None, command: list[str] | None = None) -> list[SweepResult]:
    """Run every unfinished run, `jobs` processes at a time with `threads` torch threads each.

    With several jobs and CUDA devices, job slot i sees only device i (mod the device count).
    `command` launches one training run (default ``python -m qkvlab train``); the run's arguments follow it.
    """
    command = command or [sys.executable, "-m", "qkvlab", "train"]
    check(jobs >= 1, f"--jobs must be at least 1, got {jobs}")
    check(threads is None or threads >= 1, f"--threads must be at least 1, got {threads}")
    for run in runs:  # every run's config is valid before any starts
        run.requested_run()
    threads = threads or max(1, available_cores() // jobs)
    base_env = dict(os.environ if env is None else env)
    base_env["OMP_NUM_THREADS"] = str(threads)
    base_env[PARENT_ENV] = "1"  # runs end when this process dies
    gpus = visible_gpus() if jobs > 1 else []
    results: list[SweepResult] = []
    pending: list[SweepRun] = []
    for run in runs:
        problem = summary_problem(run.run_dir)
        if problem is not None:
            print(f"note: {run.run_dir / SUMMARY} {problem}; treating the run as not finished", file=sys.stderr)
        if run_status(run.run_dir) in FINISHED and run.is_current():
            results.append(SweepResult(run, "skipped", summary=read_summary(run.run_dir) or {}))
        else:
            pending.append(run)
    bar = tqdm(total=len(runs), initial=len(results), unit="run", desc="sweep", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    running: list[_Launched] = []
    preexec = child_preexec() if os.name == "posix" else None

    def launch(run: SweepRun, slot: int) -> _Launched:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        log = open(run.run_dir / LOG, "a", encoding="utf-8")
        cmd = [*command, *run.train_args(), f"train.threads={threads}"]
        child_env = dict(base_env)
        if gpus:
            child_env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env, preexec_fn=preexec)
        return _Launched(run, proc, time.time(), log, slot)

    try:
        with _sigterm_unwinds():
            while pending or running:
                busy = {job.slot for job in running}
                for slot in range(jobs):
                    if pending and slot not in busy:
                        running.append(launch(pending.pop(0), slot))
                time.sleep(0.05)
                for job in [j for j in running if j.proc.poll() is not None]:
                    running.remove(job)
                    job.log.close()
                    result = _outcome(job)
                    results.append(result)
                    if progress:
                        bar.write(_describe(result))
                    else:
                        print(_describe(result), flush=True)
                    bar.update(1)
    finally:
        for job in running:
            job.proc.terminate()
        for job in running:
            job.proc.wait()
            job.log.close()
        bar.close()
    return results
