"""`qkvlab experiment NAME`: the study's experiments (core, context-length, scale, iso-parameter, analysis), the
positions extension, and conversion as a measured method (converted, uptrained, from scratch)."""

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
total budget). --positions rotary --rotary-values off,on adds each target with rotary values (the
converted weights with values turned by their positions), uptrained and from scratch that way.
Writes OUT/conversion.md and OUT/conversion.json; rerunning with the same settings
resumes (finished runs are skipped), other settings need --force (which replaces OUT)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("experiment", help="measured experiments: core, context-length, scale, "
                                                      "iso-parameter, positions, analysis, conversion",
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
    p.add_argument("--positions", choices=("learned", "rotary"), default=None,
                   help="positions of the sources the experiment trains (default: the preset's)")
    p.add_argument("--rotary-values", nargs="+", default=["off"],
                   help="targets without (off) and/or with (on) rotary values, e.g. off,on; on needs rotary sources")
    p.add_argument("--data-dir", default=None, help="dataset cache to look in first")
    p.add_argument("--out", default=None, help="output directory (default runs/experiment-conversion-<task>-<preset>)")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes (seeds' sources, then (seed, target) units), cores / jobs threads each")
    p.add_argument("--force", action="store_true", help="replace an --out that holds something else")
    p.set_defaults(func=run)
    for name, help_text in TRAINING.items():
        q = sub.add_parser(name, help=help_text, description=help_text, epilog=TRAINING_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        q.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every run")
        q.add_argument("--tasks", nargs="+", help="tasks (comma or space separated; default: the experiment's)")
        q.add_argument("--variants", nargs="+", help="variants (default: the experiment's)")
        q.add_argument("--seeds", nargs="+", default=["0-2"], help="seeds: 0,1,2 or 0-2 (default 0-2)")
        q.add_argument("--preset", default="quick", help="the tasks' budgets and model sizes: tiny, quick (default)")
        if name == "context-length":
            q.add_argument("--contexts", nargs="+", help="context lengths (default 32,64,128)")
        if name == "scale":
            q.add_argument("--sizes", nargs="+", help="model sizes LAYERSxD_MODEL (default 2x64,2x96,2x128)")
        q.add_argument("--out", help="output directory (default runs/experiment-<name>)")
        q.add_argument("--jobs", type=int, help="runs in parallel (default: one per GPU, else one per CPU core)")
        q.set_defaults(func=run_training, experiment_name=name)
    a = sub.add_parser("analysis", help="cos(K,V), cos(Q,K), cos(Q,V), effective ranks and score asymmetry per "
                                        "variant and layer of trained runs, with plots",
                       description="Analyse the trained runs under RUNS (a study, reproduce or sweep directory) on "
                                   "held-out inputs of each run's own task; writes analysis.md and plots.")
    a.add_argument("runs", help="directory of trained runs")
    a.add_argument("--out", help="output directory (default: RUNS/analysis)")
    a.add_argument("--batch", type=int, default=8, help="held-out examples per run (default 8)")
    a.add_argument("--force", action="store_true", help="replace an existing analysis.md in --out")
    a.set_defaults(func=run_analysis)


TRAINING = {
    "core": "every projection variant on every task family, with seeds",
    "context-length": "QKV vs Q-K=V at three context lengths, everything else fixed",
    "scale": "QKV vs Q-K=V at three model sizes, everything else fixed",
    "iso-parameter": "each tied variant with its saved attention parameters spent on MLP width",
    "positions": "QKV, Q-K=V and Q-MQA with learned, rotary and rotary-value positions (not in the study)",
}
TRAINING_EPILOG = """Runs train with the tasks' recipes at --preset (every variant of a task with the same recipe) into
OUT/<experiment>/<arm>/<task>/<variant>/seedN; rerunning skips finished runs and resumes interrupted
ones. OUT/report.md and OUT/report.json compare each variant with QKV in the same arm, paired by seed
(95 % t-intervals). `qkvlab reproduce --preset study` runs the first four and the analysis in one sweep."""


def run_training(args: argparse.Namespace) -> int:
    from qkvlab.cli.sweep import check_out_dir, parse_list, parse_seeds, positive_option
    from qkvlab.errors import QkvlabError, check
    from qkvlab.experiments.study import run_study
    from qkvlab.train.lock import DirLock

    positive_option("--jobs", args.jobs)
    check(args.preset in ("tiny", "quick"), f"--preset {args.preset!r} is not one of tiny, quick")
    stray = [item for item in args.overrides if "=" not in item]
    check(not stray, f"{stray[0]!r} is not a KEY=VALUE override" if stray else "")
    options: dict = {}
    if args.tasks is not None:
        options["tasks"] = parse_list(args.tasks)
        check(bool(options["tasks"]), "--tasks names no task")
    if args.variants is not None:
        from qkvlab.variants import parse_variant

        options["variants"] = [parse_variant(v).name for v in parse_list(args.variants)]
        check(bool(options["variants"]), "--variants names no variant")
    if getattr(args, "contexts", None) is not None:
        try:
            options["contexts"] = [int(c) for c in parse_list(args.contexts)]
        except ValueError:
            raise QkvlabError(f"--contexts {' '.join(args.contexts)!r}: context lengths are integers") from None
    if getattr(args, "sizes", None) is not None:
        from qkvlab.experiments.scale import parse_size

        options["sizes"] = parse_list(args.sizes)
        for size in options["sizes"]:
            parse_size(size)
    seeds = parse_seeds(args.seeds)
    out = args.out or f"runs/experiment-{args.experiment_name}"
    check_out_dir(out)
    command = ["qkvlab", "experiment", args.experiment_name, "--out", out, "--seeds", ",".join(map(str, seeds)),
               "--preset", args.preset, *(["--tasks", ",".join(options["tasks"])] if "tasks" in options else []),
               *(["--variants", ",".join(options["variants"])] if "variants" in options else []),
               *(["--contexts", ",".join(map(str, options["contexts"]))] if "contexts" in options else []),
               *(["--sizes", ",".join(options["sizes"])] if "sizes" in options else []), *args.overrides]
    with DirLock(out, "experiment directory"):
        result = run_study(out, seeds, experiments=[args.experiment_name], preset=args.preset, jobs=args.jobs,
                           overrides=args.overrides, options={args.experiment_name: options}, command=command)
    print(f"\nreport: {result.report}")
    for failure in result.failed:
        print(f"failed: {failure.run.task} {failure.run.variant} seed {failure.run.seed}: {failure.message}")
    return 1 if result.failed else 0


def run_analysis(args: argparse.Namespace) -> int:
    from qkvlab.cli.sweep import positive_option
    from qkvlab.experiments.analysis import write_analysis

    positive_option("--batch", args.batch)
    out = write_analysis(args.runs, args.out, batch=args.batch, force=args.force)
    print(f"wrote {out}")
    return 0


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


def _switches(option: str, items: list[str]) -> tuple[bool, ...]:
    """off / on words as booleans (a one-line error naming anything else)."""
    from qkvlab.errors import QkvlabError

    words = {"off": False, "on": True}
    for item in items:
        if item not in words:
            raise QkvlabError(f"{option} {item!r} is not off or on")
    return tuple(words[i] for i in items)


def command_line(spec, out: str, jobs: int = 1) -> str:
    """The command that reproduces `spec` into `out`, every setting spelled out."""
    words = ["qkvlab", "experiment", "conversion", "--task", spec.task, "--preset", spec.preset,
             "--seeds", ",".join(map(str, spec.seeds)), "--variants", ",".join(spec.variants),
             "--inits", ",".join(spec.inits), "--uptrain", ",".join(f"{f:g}" for f in spec.fractions),
             "--calibration-windows", str(spec.calibration_windows)]
    words += ["--source", spec.source] if spec.source else []
    words += ["--positions", spec.positions] if spec.positions else []
    words += ["--rotary-values", ",".join("on" if v else "off" for v in spec.rotary_values)] \
        if spec.rotary_values != (False,) else []
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
                          source=args.source, data_dir=args.data_dir, positions=args.positions,
                          rotary_values=_switches("--rotary-values", parse_list(args.rotary_values)))
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
