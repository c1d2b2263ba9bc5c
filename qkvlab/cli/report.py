"""`qkvlab report RUN_DIR`: Markdown tables (mean ± std over seeds, change vs QKV) and PNG plots."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("report", help="write the Markdown report and plots of a sweep directory",
                                   description=__doc__)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a sweep directory (e.g. runs/reproduce-quick)")
    parser.add_argument("--out", help="report file (default RUN_DIR/report.md; plots go next to it)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qkvlab.train.report import aggregate, collect, summary_table, write_report

    path = write_report(args.run_dir, args.out)
    print(summary_table(aggregate(collect(args.run_dir))))
    print(f"\nreport: {path}")
    return 0
