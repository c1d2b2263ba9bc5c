"""`qkvlab sweep`: train tasks x variants x seeds, several processes at once, skipping finished runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from qkvlab.errors import QkvlabError

EPILOG = """\
Runs go to OUT/<task>/<variant>/seed<k>/ (each with its train.log). Finished runs are skipped,
interrupted ones resume from their last checkpoint. KEY=VALUE overrides apply to every run,
e.g. `qkvlab sweep --out runs/lr --tasks reverse --seeds 0-2 optim.lr=1e-3`.
Variants default to each task's own list; write `qkvlab report OUT` afterwards."""


def parse_list(values: list[str] | None) -> list[str]:
    """["a,b", "c"] -> ["a", "b", "c"]."""
    return [item.strip() for value in values or [] for item in value.split(",") if item.strip()]


MAX_SEEDS = 10_000


def parse_seeds(values: list[str] | None) -> list[int]:
    """Seeds from "0,1,2", "0-4" or "0 3" (ranges inclusive, non-negative, at least one)."""
    seeds: list[int] = []
    shown = " ".join(values or [])
    for item in parse_list(values):
        lo, sep, hi = item.partition("-")
        bounds = (lo, hi) if sep else (item,)
        if not all(b.strip().isdigit() for b in bounds):
            raise QkvlabError(f"--seeds {item!r} is not a non-negative seed (0), a list (0,1,2) or a range (0-4)")
        first, last = int(bounds[0]), int(bounds[-1])
        if last < first:
            raise QkvlabError(f"--seeds range {item!r} is empty (write the smaller seed first)")
        if last - first + 1 + len(seeds) > MAX_SEEDS:
            raise QkvlabError(f"--seeds {item!r} asks for more than {MAX_SEEDS} seeds")
        seeds += range(first, last + 1)
    if not seeds:
        raise QkvlabError(f"--seeds {shown!r} gives no seed; e.g. --seeds 0-2")
    return list(dict.fromkeys(seeds))


def positive_option(name: str, value: int | None) -> None:
    """Refuse a count option (--jobs, --threads) below 1."""
    if value is not None and value < 1:
        raise QkvlabError(f"{name} must be at least 1, got {value}")


def check_out_dir(out: str) -> None:
    """Refuse an --out that is empty or names an existing file."""
    if not out.strip():
        raise QkvlabError("--out '' is empty; give a directory")
    if Path(out).exists() and not Path(out).is_dir():
        raise QkvlabError(f"--out {out!r} is an existing file, not a directory")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("sweep", help="train tasks x variants x seeds (skips finished, resumes interrupted)",
                                   description=__doc__, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every run")
    parser.add_argument("--out", required=True, help="sweep directory")
    parser.add_argument("--tasks", nargs="+", help="tasks (comma or space separated); default: the --suite")
    parser.add_argument("--suite", help="a task suite (quick, full, tiny) when --tasks is not given")
    parser.add_argument("--variants", nargs="+", help="variants (default: each task's list)")
    parser.add_argument("--seeds", nargs="+", default=["0"], help="seeds: 0,1,2 or 0-2 (default 0)")
    parser.add_argument("--preset", default="quick", help="the tasks' model and budget preset (default quick)")
    parser.add_argument("--config", help="a base YAML config for every run")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (default 1)")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: cores / jobs)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qkvlab.train.lock import DirLock
    from qkvlab.train.sweep import check_data, plan, run_sweep

    stray = [item for item in args.overrides if "=" not in item]
    if stray:
        raise QkvlabError(f"{stray[0]!r} is not a KEY=VALUE override")
    positive_option("--jobs", args.jobs)
    positive_option("--threads", args.threads)
    check_out_dir(args.out)
    seeds = parse_seeds(args.seeds)
    tasks = parse_list(args.tasks)
    if not tasks:
        if not args.suite:
            raise QkvlabError("give --tasks or --suite")
        from qkvlab.tasks.registry import SUITES

        if args.suite not in SUITES:
            raise QkvlabError(f"unknown suite {args.suite!r}; accepted: {', '.join(SUITES)}")
        tasks = list(SUITES[args.suite])
    check_data(tasks, args.overrides)
    runs = plan(args.out, tasks, seeds, variants=parse_list(args.variants) or None,
                preset=args.preset, config=args.config, overrides=args.overrides)
    for run in runs:  # every run's config is valid before the directory is touched
        run.requested_run()
    with DirLock(args.out, "sweep directory"):
        results = run_sweep(runs, jobs=args.jobs, threads=args.threads)
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "diverged", "failed")}
    print(f"sweep {args.out}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return 1 if counts["failed"] else 0
