"""Sweeps: every (task, variant, seed) trained as `qkvlab train` would, several at once.

Finished runs (a summary with status done or diverged) are skipped when their stored, resolved
config equals the request resolved the way `qkvlab train` resolves it; interrupted runs resume
from their last checkpoint, because `qkvlab train` always does. Each job slot trains its runs in one
worker process (`qkvlab.cli.worker`: PyTorch starts once per slot, not once per run). Each run writes
its output to ``<run_dir>/train.log``; runs end when the sweep process dies (even by `kill -9`).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
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


class _Slot:
    """One job slot: trains one run at a time, in a fresh `command` process per run."""

    def __init__(self, command: list[str], env: dict[str, str], preexec) -> None:
        self.command, self.env, self.preexec = command, env, preexec
        self.proc: subprocess.Popen | None = None
        self.log: TextIO | None = None

    def start(self, args: list[str], log_path: Path) -> None:
        self.log = open(log_path, "a", encoding="utf-8")
        self.log.write(f"$ {' '.join([*self.command, *args])}\n")
        self.log.flush()
        self.proc = subprocess.Popen([*self.command, *args], stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     preexec_fn=self.preexec)

    def poll(self) -> int | None:
        """The run's exit code once it has ended, else None."""
        assert self.proc is not None and self.log is not None
        code = self.proc.poll()
        if code is not None:
            self.log.close()
        return code

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()
        if self.log is not None:
            self.log.close()


class _WorkerSlot(_Slot):
    """One job slot served by a long-lived `qkvlab.cli.worker` process (started again if it dies)."""

    def start(self, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"$ qkvlab train {' '.join(args)}\n")
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, "-m", "qkvlab.cli.worker"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, env=self.env, preexec_fn=self.preexec, text=True,
                                         bufsize=1)
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"args": args, "log": str(log_path)}) + "\n")
        self.proc.stdin.flush()

    def poll(self) -> int | None:
        assert self.proc is not None and self.proc.stdout is not None
        if select.select([self.proc.stdout], [], [], 0)[0]:
            line = self.proc.stdout.readline()
            if line:
                return int(json.loads(line)["rc"])
        code = self.proc.poll()
        if code is None:
            return None
        self.proc = None  # died holding the run: the next run gets a new worker
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"qkvlab: error: the worker process training this run {how} (out of memory?)\n")
        return code if code != 0 else 1

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.terminate()
            self.proc.wait()


@dataclass
class _Launched:
    run: SweepRun
    slot: _Slot
    started: float
    returncode: int | None = None


def _outcome(job: _Launched) -> SweepResult:
    run, seconds = job.run, time.time() - job.started
    summary = read_summary(run.run_dir) or {}
    fresh = _written_since(run.run_dir / SUMMARY, job.started)
    ok = job.returncode == 0 or (job.returncode == 2 and fresh and summary.get("status") == "diverged")
    if ok and summary.get("status") in FINISHED:
        return SweepResult(run, summary["status"], seconds, summary.get("error", ""), summary)
    return SweepResult(run, "failed", seconds, f"{_last_error(run.run_dir / LOG)} (see {run.run_dir / LOG})")


def run_sweep(runs: list[SweepRun], jobs: int = 1, threads: int | None = None, progress: bool = True,
              env: dict[str, str] | None = None, command: list[str] | None = None) -> list[SweepResult]:
    """Run every unfinished run, `jobs` at a time with `threads` torch threads each.

    Each job slot keeps one worker process (`qkvlab.cli.worker`) that trains its runs one after another,
    so PyTorch starts once per slot; `command` instead launches a fresh process per run (e.g. a wrapper
    around ``python -m qkvlab train``), the run's arguments following it. With several jobs and CUDA
    devices, job slot i sees only device i (mod the device count).
    """
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
    preexec = child_preexec() if os.name == "posix" else None
    slots: list[_Slot] = []
    for i in range(min(jobs, len(pending))):
        slot_env = dict(base_env)
        if gpus:
            slot_env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        slots.append(_Slot(command, slot_env, preexec) if command else _WorkerSlot([], slot_env, preexec))
    running: list[_Launched] = []

    def launch(run: SweepRun, slot: _Slot) -> _Launched:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        slot.start([*run.train_args(), f"train.threads={threads}"], run.run_dir / LOG)
        return _Launched(run, slot, time.time())

    try:
        with _sigterm_unwinds():
            while pending or running:
                busy = [job.slot for job in running]
                for slot in slots:
                    if pending and not any(slot is b for b in busy):
                        running.append(launch(pending.pop(0), slot))
                time.sleep(0.05)
                for job in list(running):
                    job.returncode = job.slot.poll()
                    if job.returncode is None:
                        continue
                    running.remove(job)
                    result = _outcome(job)
                    results.append(result)
                    if progress:
                        bar.write(_describe(result))
                    else:
                        print(_describe(result), flush=True)
                    bar.update(1)
    finally:
        for slot in slots:
            slot.stop()
        bar.close()
    return results
