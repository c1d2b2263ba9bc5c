"""`qkvlab reproduce`: every variant on a suite of tasks, then the report (the study end to end)."""

from __future__ import annotations

import argparse
import time

EPILOG = """\
Presets: quick (default; one seed per run, the suite's quick budgets, ~19 minutes on 2 CPU
cores), full (three seeds, full models and budgets, for a GPU machine: one run per GPU at a
time), tiny (a smoke test).
Rerunning skips finished runs and resumes interrupted ones. Needs the data: `qkvlab data fetch quick`."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("reproduce", help="run the study: every variant on a task suite, then the report",
                                   description=__doc__, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every run")
    parser.add_argument("--preset", default="quick", help="quick (default), full or tiny")
    parser.add_argument("--out", help="output directory (default runs/reproduce-<preset>)")
    parser.add_argument("--seeds", nargs="+", help="seeds: 0,1,2 or 0-2 (default: the preset's)")
    parser.add_argument("--jobs", type=int, help="runs in parallel (default: one per GPU, else one per CPU core)")
    parser.add_argument("--tasks", nargs="+", help="restrict to these tasks (comma or space separated)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qkvlab.cli.sweep import check_out_dir, parse_list, parse_seeds, positive_option
    from qkvlab.errors import QkvlabError
    from qkvlab.train.lock import DirLock
    from qkvlab.train.reproduce import get_preset, reproduce

    stray = [item for item in args.overrides if "=" not in item]
    if stray:
        raise QkvlabError(f"{stray[0]!r} is not a KEY=VALUE override")
    positive_option("--jobs", args.jobs)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    out = args.out if args.out is not None else str(get_preset(args.preset).default_out())
    check_out_dir(out)
    if args.tasks is not None and not parse_list(args.tasks):
        raise QkvlabError(f"--tasks {' '.join(args.tasks)!r} names no task")
    started = time.perf_counter()
    with DirLock(out, "reproduce directory"):
        result = reproduce(args.preset, out=out, seeds=seeds, jobs=args.jobs, tasks=parse_list(args.tasks) or None,
                           overrides=args.overrides)
    print()
    print(result.table)
    print(f"\nreport: {result.report}  ({time.perf_counter() - started:.0f}s)")
    for failure in result.failed:
        print(f"failed: {failure.run.task} {failure.run.variant} seed {failure.run.seed}: {failure.message}")
    return 1 if result.failed else 0
