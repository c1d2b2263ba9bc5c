"""`qkvlab report RUN_DIR`: report.md (mean ± std over seeds, paired 95 % CI vs QKV), report.json and PNG plots."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from qkvlab.errors import QkvlabError, check


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("report", help="write the Markdown report and plots of a sweep directory",
                                   description=__doc__)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a sweep directory (e.g. runs/reproduce-quick)")
    parser.add_argument("--out", help="report file, ending in .md (default RUN_DIR/report.md; report.json and "
                                      "plots/ go next to it)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    parser.add_argument("--allow-missing", action="store_true",
                        help="report the readable runs even when some are unfinished or corrupt (they are listed)")
    parser.add_argument("--no-analysis", action="store_true",
                        help="skip the Q/K/V analysis of the trained models (faster)")
    parser.set_defaults(func=run)


def check_out(out: Path, force: bool) -> None:
    """--out must be a .md file that is not an input of any run; an existing one only with --force."""
    from qkvlab.train.report import INPUT_FILES

    check(out.suffix == ".md", f"--out {str(out)!r} must end in .md (report.json is written next to it)")
    for path in (out, out.with_suffix(".json")):
        check(not path.is_dir(), f"--out {str(out)!r}: {str(path)!r} is a directory")
        check(path.name not in INPUT_FILES and "checkpoints" not in path.parts,
              f"--out {str(out)!r} would overwrite {str(path)!r}, a file of a run; choose a file outside the runs")
        check(force or not path.exists(), f"--out {str(out)!r}: {str(path)!r} already exists; "
                                          "pass --force to overwrite it")


def run(args: argparse.Namespace) -> int:
    from qkvlab.train.report import aggregate, collect, scan, summary_table, write_report

    root = Path(args.run_dir)
    check(root.exists(), f"run directory {args.run_dir!r} does not exist")
    if args.out is not None:
        check_out(Path(args.out), args.force)
    if not root.is_dir():
        raise QkvlabError(f"{args.run_dir!r} is a file, not a directory of runs"
                          + (f" (a run's summary; its run directory is {str(root.parent)!r})"
                             if root.name == "summary.json" else ""))
    command = "qkvlab " + shlex.join(sys.argv[1:]) if Path(sys.argv[0]).name in ("qkvlab", "__main__.py") else None
    path = write_report(root, args.out, command=command, allow_missing=args.allow_missing,
                        analyze=not args.no_analysis)
    for skipped in scan(root)[1]:
        print(f"skipped {skipped.run_dir}: {skipped.reason}", file=sys.stderr)
    print(summary_table(aggregate(collect(root))))
    print(f"\nreport: {path}")
    return 0
