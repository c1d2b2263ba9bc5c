"""A sweep's fixed cost per run: one worker process per job slot (the default) against a fresh
`python -m qkvlab train` process per run (what sweeps did before `qkvlab.cli.worker`).

Both sides train the same short runs (quick-preset tasks cut to a few steps, so start-up is most of a run),
into fresh directories, alternating side by side; prints each side's median wall time per run and the
ratio. Needs the tasks' data (`qkvlab data fetch quick`).

    python benchmarks/sweep_workers.py                       # sort-32 and mnist, 4 runs each, 2 jobs, 3 rounds
    python benchmarks/sweep_workers.py --tasks shakespeare-char --steps 5 --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

from qkvlab.train.sweep import plan, run_sweep

VARIANTS = ["QKV", "Q=K-V", "Q-K=V", "Q=K=V"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["sort-32", "mnist"])
    p.add_argument("--steps", type=int, default=10, help="training steps per run (default 10)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    return p.parse_args()


def one_sweep(root: Path, tasks: list[str], steps: int, jobs: int, per_run_process: bool) -> tuple[float, int]:
    runs = [run for task in tasks
            for run in plan(root, [task], [0], variants=VARIANTS, preset="quick",
                            overrides=[f"train.steps={steps}", f"train.eval_every={steps}",
                                       "train.tensorboard=false"])]
    command = [sys.executable, "-m", "qkvlab", "train"] if per_run_process else None
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the sweep's line per run
        results = run_sweep(runs, jobs=jobs, threads=1, progress=False, command=command)
    seconds = time.perf_counter() - started
    failed = [r for r in results if r.status != "done"]
    if failed:
        raise SystemExit(f"a run failed: {failed[0].message}")
    return seconds, len(runs)


def main() -> None:
    args = parse_args()
    times: dict[str, list[float]] = {"process per run": [], "worker per slot": []}
    n_runs = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for side in (list(times) if r % 2 == 0 else list(reversed(times))):
                seconds, n_runs = one_sweep(Path(tmp) / f"{side.replace(' ', '-')}-{r}", args.tasks, args.steps,
                                            args.jobs, side == "process per run")
                times[side].append(seconds)
    print(f"{n_runs} runs ({', '.join(args.tasks)}; {args.steps} steps each), {args.jobs} jobs, "
          f"{args.rounds} rounds, medians:")
    medians = {side: statistics.median(values) for side, values in times.items()}
    for side, median in medians.items():
        print(f"  {side:<16} {median:6.1f} s per sweep, {median * args.jobs / n_runs:5.2f} core-s per run")
    saved = (medians["process per run"] - medians["worker per slot"]) * args.jobs / n_runs
    print(f"  worker / process: {medians['process per run'] / medians['worker per slot']:.2f}x faster; "
          f"{saved:.2f} core-s saved per run")


if __name__ == "__main__":
    main()
