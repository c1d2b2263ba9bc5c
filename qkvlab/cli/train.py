"""`qkvlab train [CONFIG] [KEY=VALUE ...]`: train one run, resuming it if it was interrupted."""

from __future__ import annotations

import argparse

EPILOG = """\
CONFIG is a YAML file, a packaged config (lm-300m, lm-1.2b, example-*) or a run directory (its
stored config; `qkvlab train RUN_DIR train.steps=N` extends a finished run). Any key can be
overridden once with a dotted name: optim.lr=3e-4 train.steps=100 model.n_layers=4 variant=Q-K=V.
A run directory that holds checkpoints is resumed; a finished one is left alone. One process
at a time trains in a run directory.
Under `torchrun --nproc_per_node N` the same command trains data-parallel (DDP, or FSDP with
distributed.strategy=fsdp). See docs/training.md."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train one run from a YAML config (resumes interrupted runs)",
                                   description=__doc__, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("items", nargs="*", metavar="CONFIG | KEY=VALUE",
                        help="a config file or packaged config name, then dotted overrides")
    parser.add_argument("--restart", action="store_true",
                        help="discard the run directory's checkpoints, metrics and summary and start over")
    parser.set_defaults(func=run)


def split_items(items: list[str]) -> tuple[str | None, list[str]]:
    """(config name or None, overrides): the config is the first item without '='."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def run(args: argparse.Namespace) -> int:
    from qkvlab.errors import QkvlabError
    from qkvlab.train.config import find_config, load_config
    from qkvlab.train.lock import watch_parent
    from qkvlab.train.trainer import train

    watch_parent()  # a run started by a sweep ends with the sweep

    config, overrides = split_items(args.items)
    stray = [item for item in overrides if "=" not in item]
    if stray:
        raise QkvlabError(f"{stray[0]!r} is not a KEY=VALUE override (only the first argument may be a config)")
    if config is None and not overrides:
        raise QkvlabError("give a config file (or packaged config name) and/or KEY=VALUE overrides, "
                          "e.g. qkvlab train task=reverse variant=Q-K=V")
    cfg = load_config(find_config(config) if config else None, overrides)
    summary = train(cfg, restart=args.restart)
    final = summary.get("final", {})
    metric = summary.get("metric", "")
    shown = f"{metric} {final[metric]:.4g}" if metric in final else "no metric"
    print(f"{summary['status']}: {summary['task']} {summary['variant']} seed {summary['seed']}: {shown}, "
          f"{summary['wall_time_s']:.1f}s -> {summary['run_dir']}")
    return 0
