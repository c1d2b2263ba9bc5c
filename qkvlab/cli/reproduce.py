"""`qkvlab reproduce`: every variant on a suite of tasks, then the report (the study end to end)."""

from __future__ import annotations

import argparse
import time

EPILOG = """\
Presets: quick (default; one seed per run, the suite's quick budgets, 11 minutes on 2 CPU cores
with bf16 hardware, 13-17 in float32), full (three seeds, full models and budgets, for a GPU
machine: one run per GPU at a time), tiny (a smoke test), study (three seeds of the study's
experiments on CPU-sized models, ~2 h on 2 CPU cores), paper (the paper's 300M and 1.2B
language models on token shards you supply, one torchrun job after another on --gpus GPUs;
--dry-run prints the runs, their commands and their expected GPU-hours).
Rerunning skips finished runs and resumes interrupted ones. Needs the data: `qkvlab data fetch
quick` (study: `qkvlab data fetch study`; paper: `qkvlab data tokenize --tokenizer gpt2 --out DIR
FILES...`, then --data-dir DIR)."""

PAPER_ONLY = ("data_dir", "gpus", "gpu", "mfu", "peak_tflops", "scales", "dry_run")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("reproduce", help="run the study: every variant on a task suite, then the report",
                                   description=__doc__, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every run")
    parser.add_argument("--preset", default="quick", help="quick (default), full, tiny, study or paper")
    parser.add_argument("--out", help="output directory (default runs/reproduce-<preset>)")
    parser.add_argument("--seeds", nargs="+", help="seeds: 0,1,2 or 0-2 (default: the preset's)")
    parser.add_argument("--jobs", type=int, help="runs in parallel (default: one per GPU, else one per CPU core)")
    parser.add_argument("--tasks", nargs="+", help="restrict to these tasks (comma or space separated)")
    paper = parser.add_argument_group("--preset paper")
    paper.add_argument("--data-dir", help="token directory (qkvlab data tokenize --tokenizer gpt2 --out DIR FILES...)")
    paper.add_argument("--gpus", type=int, help="GPUs per run (default: the CUDA devices, else 8)")
    paper.add_argument("--gpu", help="GPU model the GPU-hours assume: a100, h100, h100-pcie "
                                     "(default: the detected GPU, else a100)")
    paper.add_argument("--peak-tflops", type=float, help="dense bf16 peak TFLOP/s, instead of --gpu's")
    paper.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation assumed (default 0.4)")
    paper.add_argument("--scales", nargs="+", help="300m, 1.2b (default: both)")
    paper.add_argument("--dry-run", action="store_true", help="print the plan (runs, commands, GPU-hours) only")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qkvlab.cli.sweep import check_out_dir, parse_list, parse_seeds, positive_option
    from qkvlab.errors import QkvlabError
    from qkvlab.train.lock import DirLock

    stray = [item for item in args.overrides if "=" not in item]
    if stray:
        raise QkvlabError(f"{stray[0]!r} is not a KEY=VALUE override")
    if args.preset == "paper":
        return run_paper(args)
    from qkvlab.train.reproduce import PRESETS, get_preset, reproduce

    if args.preset not in PRESETS:  # the generic presets, and paper (routed above)
        raise QkvlabError(f"unknown reproduce preset {args.preset!r}; accepted: {', '.join([*PRESETS, 'paper'])}")
    given = [name for name in PAPER_ONLY if getattr(args, name) not in (None, False)]
    if given:
        raise QkvlabError(f"--{given[0].replace('_', '-')} applies only to --preset paper")

    positive_option("--jobs", args.jobs)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    out = args.out if args.out is not None else str(get_preset(args.preset).default_out())
    check_out_dir(out)
    if args.tasks is not None and not parse_list(args.tasks):
        raise QkvlabError(f"--tasks {' '.join(args.tasks)!r} names no task")
    started = time.perf_counter()
    with DirLock(out, "reproduce directory"):
        if args.preset == "study":
            from qkvlab.experiments.study import reproduce_study

            result = reproduce_study(out, seeds=seeds, jobs=args.jobs, tasks=parse_list(args.tasks) or None,
                                     overrides=args.overrides)
        else:
            result = reproduce(args.preset, out=out, seeds=seeds, jobs=args.jobs,
                               tasks=parse_list(args.tasks) or None, overrides=args.overrides)
    print()
    print(result.table)
    print(f"\nreport: {result.report}  ({time.perf_counter() - started:.0f}s)")
    for failure in result.failed:
        print(f"failed: {failure.run.task} {failure.run.variant} seed {failure.run.seed}: {failure.message}")
    return 1 if result.failed else 0


def run_paper(args: argparse.Namespace) -> int:
    """`--preset paper`: print the plan; on a CUDA machine (without --dry-run) launch its runs in turn."""
    import subprocess
    import sys

    from qkvlab.cli.sweep import check_out_dir, parse_list, parse_seeds, positive_option
    from qkvlab.errors import QkvlabError
    from qkvlab.table import human_count
    from qkvlab.train import paper
    from qkvlab.train.lock import DirLock

    for name in ("jobs", "tasks"):
        if getattr(args, name) is not None:
            raise QkvlabError(f"--{name} does not apply to --preset paper (its runs go one after another, "
                              "each on all --gpus); use --scales to choose the model sizes")
    positive_option("--gpus", args.gpus)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else [0]
    scales = parse_list(args.scales) if args.scales is not None else list(paper.SCALES)
    if not scales:
        raise QkvlabError(f"--scales {' '.join(args.scales)!r} names no scale; accepted: {', '.join(paper.SCALES)}")
    out = args.out if args.out is not None else "runs/reproduce-paper"
    check_out_dir(out)
    devices = paper.cuda_devices()
    if args.gpu is not None:
        gpu = paper.get_gpu(args.gpu)
    else:
        gpu = (paper.detect_gpu() if devices else None) or paper.GPUS["a100"]
    throughput = paper.Throughput(gpu, mfu=paper.DEFAULT_MFU if args.mfu is None else args.mfu,
                                  peak_tflops=args.peak_tflops)
    gpus = args.gpus if args.gpus is not None else (devices or paper.PAPER_GPUS)
    plan = paper.plan(gpus=gpus, throughput=throughput, out=out, data_dir=args.data_dir, seeds=seeds,
                      scales=scales, overrides=args.overrides)
    note = None
    if args.data_dir is not None:
        models = [run.resolved.model for run in plan.runs]
        note = paper.check_data_dir(args.data_dir, min(m.vocab_size for m in models),
                                    max(m.max_seq_len for m in models))
    print(format_plan(plan))
    if note is not None:
        print(f"data: {note}; each run reads {human_count(max(run.tokens for run in plan.runs))} tokens")
    if args.dry_run:
        return 0
    if not devices:
        raise QkvlabError("no CUDA GPU found on this machine; nothing launched (--dry-run shows the plan only)")
    if args.data_dir is None:
        raise QkvlabError("--preset paper needs --data-dir DIR, a token directory made with "
                          "`qkvlab data tokenize --tokenizer gpt2 --out DIR FILES...`")
    if gpus > devices:
        raise QkvlabError(f"--gpus {gpus} but this machine has {devices} CUDA GPU(s); accepted: 1 to {devices}")
    started = time.perf_counter()
    with DirLock(out, "reproduce directory"):
        for i, run in enumerate(plan.runs, 1):
            print(f"\n[{i}/{len(plan.runs)}] {run.config_name} {run.variant} seed {run.seed} "
                  f"(expected {run.wall_hours(throughput):.1f} h): {run.command_line()}", flush=True)
            code = subprocess.run(paper.launch_command(run), check=False).returncode
            if code != 0:
                print(f"failed: {run.config_name} {run.variant} seed {run.seed}: torchrun exited with {code}; "
                      f"rerun the same command to resume (finished runs are skipped)", file=sys.stderr)
                return 1
    print(f"\nall {len(plan.runs)} runs finished in {(time.perf_counter() - started) / 3600:.1f} h; "
          f"report: qkvlab report {out}")
    return 0


def format_plan(plan) -> str:
    """The plan as text: the assumptions, a table of runs with their costs, the commands, the totals."""
    from qkvlab.table import format_table, human_bytes, human_count
    from qkvlab.train.paper import DATA_PLACEHOLDER

    t = plan.throughput
    wall = f"wall h ({plan.gpus} GPU{'s' if plan.gpus > 1 else ''})"
    rows = [{"config": run.config_name, "variant": run.variant, "seed": run.seed,
             "params": human_count(run.params), "tokens": human_count(run.tokens),
             "steps x batch": f"{run.steps:,} x {run.batch_size}",
             "grad_accum": run.resolved.config.train.grad_accum, "FLOPs": f"{run.flops:.2e}",
             "GPU-h": f"{run.gpu_hours(t):,.1f}", wall: f"{run.wall_hours(t):,.1f}",
             "memory/GPU": f"~{human_bytes(run.memory_bytes)}"} for run in plan.runs]
    right = {"params", "tokens", "steps x batch", "FLOPs", "GPU-h", wall, "memory/GPU"}
    lines = [f"paper preset: {len(plan.runs)} runs, one after another, each on {plan.gpus} GPUs (torchrun)",
             f"throughput assumed: {t.describe()}",
             "cost: FLOPs = 6 x forward MACs per sequence (qkvlab cost) x steps x batch; "
             "memory/GPU is a rough estimate (docs/training.md)",
             "", format_table(rows, right=right), "",
             f"total: {len(plan.runs)} runs, {human_count(plan.total_tokens)} tokens, {plan.total_flops:.2e} FLOPs, "
             f"{plan.total_gpu_hours:,.0f} GPU-hours = {plan.total_wall_hours:,.1f} h wall on {plan.gpus} GPUs",
             "", "commands:"]
    lines += [run.command_line() for run in plan.runs]
    if plan.data_dir is None:
        lines.append(f"({DATA_PLACEHOLDER}: a token directory made with "
                     "`qkvlab data tokenize --tokenizer gpt2 --out DIR FILES...`)")
    return "\n".join(lines)
