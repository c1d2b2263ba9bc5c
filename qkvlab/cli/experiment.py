"""`qkvlab experiment conversion`: conversion as a measured method (converted, uptrained, from scratch)."""

from __future__ import annotations

import argparse
import shlex
import time

PRESETS = ("tiny", "quick", "full")

EPILOG = """\
For each seed: the task's QKV model trained with the preset's recipe (N steps; or --source RUN),
converted to each --variants target with each --inits initialisation (keep K, keep V, mean, lsq
fitted on calibration windows), evaluated as converted, after uptraining for each --uptrain
fraction of N, and against the target trained from scratch for (1 + fraction) x N steps (the same
total budget). Writes OUT/conversion.md and OUT/conversion.json; rerunning with the same settings
resumes (finished runs are skipped), other settings need --force (which replaces OUT)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("experiment", help="measured experiments (conversion: convert, uptrain, scratch)",
                                   description=__doc__)
    sub = parser.add_subparsers(dest="experiment", required=True, parser_class=type(parser))
    p = sub.add_parser("conversion", help="a trained QKV model converted to K=V / GQA: converted, uptrained, "
                                          "from scratch", description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="shakespeare-char", help="task (default shakespeare-char)")
    p.add_argument("--preset", default="quick", help="the task's budget and model size: tiny, quick (default), full")
    p.add_argument("--seeds", nargs="+", default=["0-2"], help="seeds: 0,1,2 or 0-2 (default 0-2)")
    p.add_argument("--variants", nargs="+", default=["Q-K=V,Q-GQA-4"], help="targets (default Q-K=V,Q-GQA-4)")
    p.add_argument("--inits", nargs="+", default=["k,v,mean,lsq"],
                   help="initialisations of the shared projection: k, v, mean, lsq (default all)")
    p.add_argument("--uptrain", nargs="+", default=["0.05,0.2"],
                   help="uptraining budgets as fractions of the source's steps (default 0.05,0.2)")
    p.add_argument("--calibration-windows", type=int, default=64, help="training windows lsq is fitted on (64)")
    p.add_argument("--source", default=None, help="a trained run directory to convert instead of training one")
    p.add_argument("--data-dir", default=None, help="dataset cache to look in first")
    p.add_argument("--out", default=None, help="output directory (default runs/experiment-conversion-<task>-<preset>)")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes (seeds' sources, then (seed, target) units), cores / jobs threads each")
    p.add_argument("--force", action="store_true", help="replace an --out that holds something else")
    p.set_defaults(func=run)


def _fractions(values: list[str]) -> tuple[float, ...]:
    from qkvlab.cli.sweep import parse_list
    from qkvlab.errors import QkvlabError

    out = []
    for item in parse_list(values):
        try:
            out.append(float(item.rstrip("%")) / (100 if item.endswith("%") else 1))
        except ValueError:
            raise QkvlabError(f"--uptrain {item!r} is not a fraction (0.05) or a percentage (5%)") from None
    if not out:
        raise QkvlabError("--uptrain names no fraction")
    return tuple(out)


def command_line(spec, out: str, jobs: int = 1) -> str:
    """The command that reproduces `spec` into `out`, every setting spelled out."""
    words = ["qkvlab", "experiment", "conversion", "--task", spec.task, "--preset", spec.preset,
             "--seeds", ",".join(map(str, spec.seeds)), "--variants", ",".join(spec.variants),
             "--inits", ",".join(spec.inits), "--uptrain", ",".join(f"{f:g}" for f in spec.fractions),
             "--calibration-windows", str(spec.calibration_windows)]
    words += ["--source", spec.source] if spec.source else []
    words += ["--data-dir", spec.data_dir] if spec.data_dir else []
    words += ["--jobs", str(jobs)] if jobs != 1 else []
    return shlex.join(words + ["--out", out])


def run(args: argparse.Namespace) -> int:
    from qkvlab.cli.sweep import check_out_dir, parse_list, parse_seeds, positive_option
    from qkvlab.errors import check
    from qkvlab.experiments.conversion import ConversionSpec, run_conversion
    from qkvlab.train.lock import DirLock

    positive_option("--jobs", args.jobs)
    check(args.preset in PRESETS, f"--preset {args.preset!r} is not one of {', '.join(PRESETS)}")
    spec = ConversionSpec(task=args.task, preset=args.preset, seeds=tuple(parse_seeds(args.seeds)),
                          variants=tuple(parse_list(args.variants)), inits=tuple(parse_list(args.inits)),
                          fractions=_fractions(args.uptrain), calibration_windows=args.calibration_windows,
                          source=args.source, data_dir=args.data_dir)
    if args.source is None:
        from qkvlab.train.runs import load_task

        load_task(args.task, args.data_dir)  # an unknown task fails before anything is written
    out = args.out if args.out is not None else f"runs/experiment-conversion-{args.task}-{args.preset}"
    check_out_dir(out)
    started = time.perf_counter()
    with DirLock(out, "experiment directory"):
        result = run_conversion(spec, out, force=args.force, command=command_line(spec, out, args.jobs),
                                jobs=args.jobs)
    print()
    print(result.table)
    print(f"\nwrote {result.markdown} and {result.json} ({time.perf_counter() - started:.0f} s)")
    return 0
