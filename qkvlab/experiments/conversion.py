"""Conversion as a measured method: a trained QKV model converted to a cache-saving variant, right
after conversion, after uptraining, and against training that variant from scratch.

Per seed s (the source's budget is N steps of B rows, peak lr, warmup W: the preset's recipe):

1. **source**: the task's QKV model trained with the preset's recipe (seed s), or a given run
   directory (`source`: its stored config gives the task, preset and N; the same source for every seed);
2. **converted**: for each target variant and initialisation of the shared projection (`qkvlab.convert`:
   keep K, keep V, their mean, `lsq` fitted on `calibration_windows` training windows drawn with
   seed s at step N), the held-out metric of the converted model, untrained;
3. **uptrained**: training continues from the converted weights for f·N steps (each f in
   `fractions`) with the preset's batch and peak lr, a cosine schedule over those steps and warmup
   f·W; its batches are drawn with seed 1000 + s, so they are new windows rather than a replay of
   the source's first steps;
4. **scratch**: the target variant trained from its initialisation (seed s) with the *same total
   budget* as source + uptraining: (1 + f)·N steps of B rows, the preset's recipe otherwise.

Targets that do not tie K and V (GQA-g, MQA) pool keys and values separately, so keep K / keep V
equal the mean there; they run `mean` and `lsq` only. With rotary sources (`positions`), each target may also
be converted to rotary values (`rotary_values`: `qkvlab.convert.with_rotary_values`, the same weights with
values turned by their positions), uptrained that way and trained that way from scratch. Every metric is the
task's held-out evaluation as the trainer runs it (for language models, perplexity on the whole validation split).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qkvlab.atomic import atomic_write_json, atomic_write_text, check_output
from qkvlab.errors import QkvlabError, check
from qkvlab.variants import parse_variant

INIT_LABELS = {"k": "keep K", "v": "keep V", "mean": "mean", "lsq": "lsq (calibrated)"}
UPTRAIN_SEED_OFFSET = 1000
SPEC_FILE = "experiment.json"


@dataclass(frozen=True)
class ConversionSpec:
    """What `run_conversion` measures (stored in OUT/experiment.json; a rerun with the same spec resumes)."""

    task: str = "shakespeare-char"
    preset: str = "quick"
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = ("Q-K=V", "Q-GQA-4")
    inits: tuple[str, ...] = ("k", "v", "mean", "lsq")
    fractions: tuple[float, ...] = (0.05, 0.2)
    calibration_windows: int = 64
    source: str | None = None
    data_dir: str | None = None
    positions: str | None = None  # the trained sources' positions (None: the preset's); not with `source`
    rotary_values: tuple[bool, ...] = (False,)  # targets without / with rotary values (True needs rotary)

    def __post_init__(self) -> None:
        from qkvlab.convert import MERGES

        check(len(self.seeds) >= 1 and all(isinstance(s, int) and s >= 0 for s in self.seeds),
              f"seeds must be non-negative integers, got {list(self.seeds)}")
        check(len(set(self.seeds)) == len(self.seeds), f"seeds repeat: {list(self.seeds)}")
        check(len(self.variants) >= 1, "give at least one target variant")
        names = []
        for name in self.variants:
            spec = parse_variant(name)
            check(spec.kv_tied or spec.kv_heads is not None,
                  f"variant {spec.name} shares no key/value projection or heads; the conversion experiment "
                  "targets K=V (Q-K=V, Q=K=V, ...) and GQA/MQA variants")
            names.append(spec.name)
        object.__setattr__(self, "variants", tuple(dict.fromkeys(names)))
        check(len(self.inits) >= 1, "give at least one initialisation")
        for init in self.inits:
            check(init in MERGES, f"initialisation {init!r} is not one of {', '.join(MERGES)}")
        object.__setattr__(self, "inits", tuple(dict.fromkeys(self.inits)))
        for f in self.fractions:
            check(isinstance(f, (int, float)) and math.isfinite(f) and 0 < f <= 10,
                  f"uptraining fraction {f!r} must be in (0, 10] (0.05 = 5 % of the source's steps)")
        object.__setattr__(self, "fractions", tuple(sorted(set(float(f) for f in self.fractions))))
        check(self.source is None or (Path(self.source) / "config.yaml").is_file(),
              f"--source {self.source} is not a run directory (no config.yaml); give a directory written by "
              "`qkvlab train`")
        check(self.calibration_windows >= 1, f"calibration_windows must be at least 1, got {self.calibration_windows}")
        check(self.positions is None or self.source is None,
              "positions applies to the sources the experiment trains; a given --source keeps its own")
        check(self.positions in (None, "learned", "rotary"),
              f"positions {self.positions!r} is not one of learned, rotary")
        check(len(self.rotary_values) >= 1 and all(isinstance(v, bool) for v in self.rotary_values),
              f"rotary_values must be false and/or true, got {list(self.rotary_values)}")
        object.__setattr__(self, "rotary_values", tuple(sorted(set(self.rotary_values))))
        check(not any(self.rotary_values) or self.source is not None or self.positions == "rotary",
              "targets with rotary values need rotary sources: add --positions rotary (or a rotary --source)")

    def inits_for(self, variant: str) -> tuple[str, ...]:
        """The initialisations that differ for `variant`: keep K / keep V only where K and V are tied."""
        if parse_variant(variant).kv_tied:
            return self.inits
        return tuple(i for i in self.inits if i in ("mean", "lsq")) or ("mean",)

    def targets(self) -> list[tuple[str, bool]]:
        """(variant, rotary values) for every target, in order."""
        return [(v, rv) for v in self.variants for rv in self.rotary_values]

    def to_dict(self) -> dict:
        """Every setting; the positions settings only where they differ from the defaults, so an experiment
        directory written before they existed still resumes."""
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}
        if self.positions is None:
            del d["positions"]
        if self.rotary_values == (False,):
            del d["rotary_values"]
        return d


def target_label(variant: str, rotary_values: bool) -> str:
    return f"{variant}, rotary values" if rotary_values else variant


@dataclass
class Result:
    """Rows (one measurement each), the aggregated cells, and where the table and JSON were written."""

    rows: list[dict] = field(default_factory=list)
    table: str = ""
    markdown: Path | None = None
    json: Path | None = None


def _slug(variant: str, rotary_values: bool = False) -> str:
    return variant.replace("/", "_") + ("-rv" if rotary_values else "")


def _pct(f: float) -> str:
    return f"{100 * f:g}"


def _budget_steps(n: int, f: float) -> int:
    return max(1, round(f * n))


def prepare_out(out: str | Path, spec: ConversionSpec, force: bool) -> Path:
    """OUT for `spec`: new or empty, an experiment with the same spec (resumed), or replaced with `force`.
    The directory's lock file (held by the caller) is not content and is kept."""
    from qkvlab.train.lock import LOCK

    out = Path(out)
    stored = out / SPEC_FILE
    if stored.is_file():
        try:
            if json.loads(stored.read_text()) == spec.to_dict():
                return out
        except (OSError, ValueError):
            pass
    for src in [spec.source] if spec.source else []:
        check_output(out, True, sources=[src])  # never into, onto or around the source
    content = [p for p in out.iterdir() if p.name != LOCK] if out.is_dir() else []
    if content and not force:
        what = "a conversion experiment with other settings" if stored.is_file() else "other files"
        raise QkvlabError(f"--out {out} holds {what}; choose another --out, or pass --force to replace it")
    for path in content:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stored, spec.to_dict())
    return out


def _source_config(spec: ConversionSpec, out: Path, seed: int):
    """The source run's RunConfig: a given run directory's stored config, or the preset's QKV recipe."""
    from qkvlab.train.config import RunConfig, TrainConfig, load_config

    if spec.source is not None:
        return load_config(Path(spec.source) / "config.yaml")
    model = {} if spec.positions is None else {"positions": spec.positions}
    return RunConfig(task=spec.task, variant="QKV", seed=seed, preset=spec.preset, data_dir=spec.data_dir, model=model,
                     train=TrainConfig(eval_every=0, checkpoint_every=0, progress=False,
                                       out_dir=str(out / "runs" / f"seed{seed}" / "source")))


def _evaluate(resolved, model) -> dict[str, float]:
    from qkvlab.tasks.common import evaluating
    from qkvlab.train.config import ALL

    t = resolved.config.train
    batches = t.eval_batches
    with evaluating(model):
        metrics = resolved.task.evaluate(model, t.eval_batch_size or t.batch_size, None if batches == ALL else batches)
    return {k: float(v) for k, v in metrics.items()}


def _say(message: str) -> None:
    print(message, flush=True)


def _resolved_source(spec: ConversionSpec, out: Path, seed: int):
    """(resolved source run, its budget N and warmup W)."""
    from qkvlab.train.config import resolve_run

    resolved = resolve_run(_source_config(spec, out, seed))
    check(resolved.model.variant == "QKV" or spec.source is not None, "the source must be a QKV model")
    n, w = resolved.config.train.steps, resolved.config.schedule.warmup_steps
    assert n is not None and w is not None  # resolved: the budget is filled in
    return resolved, n, w


def _source_stage(spec: ConversionSpec, out: Path, seed: int) -> list[dict]:
    """Train (or find) the source of `seed`; its row."""
    from qkvlab.models.io import load_model
    from qkvlab.train.trainer import train

    resolved, n, _ = _resolved_source(spec, out, seed)
    metric = resolved.task.metric
    if spec.source is None:
        summary = train(resolved)
    else:
        t0 = time.perf_counter()
        summary = {"final": _evaluate(resolved, load_model(spec.source)), "run_dir": spec.source,
                   "wall_time_s": round(time.perf_counter() - t0, 3)}
    value = summary["final"][metric]
    _say(f"[seed {seed}] source {resolved.model.variant}: {metric} {value:.4g} ({n} steps)")
    return [{"seed": seed, "variant": resolved.model.variant, "init": None, "stage": "source", "fraction": 0.0,
             "steps": n, "total_steps": n, metric: value, "run_dir": str(summary["run_dir"]),
             "wall_s": summary["wall_time_s"]}]


def _variant_stage(spec: ConversionSpec, out: Path, seed: int, variant: str, rv: bool = False) -> list[dict]:
    """Convert seed's source to `variant` (with rotary values: `rv`) with each initialisation, uptrain each, and
    train it from scratch."""
    from qkvlab.convert import convert_variant, with_rotary_values
    from qkvlab.models.io import load_model, save_model
    from qkvlab.models.tokenizer import recorded_tokenizer
    from qkvlab.train.config import RunConfig, TrainConfig
    from qkvlab.train.trainer import train

    resolved, n, w = _resolved_source(spec, out, seed)
    task, cfg, metric = resolved.task, resolved.config, resolved.task.metric
    source_dir = spec.source or cfg.train.out_dir
    source, tokenizer = load_model(source_dir), recorded_tokenizer(source_dir)
    calibration = task.model_inputs(task.train_batch(n, spec.calibration_windows, seed))
    rows = []
    here = out / "runs" / f"seed{seed}"
    label = target_label(variant, rv)
    for init in spec.inits_for(variant):
        name = f"{_slug(variant, rv)}-{init}"
        model_dir = out / "converted" / f"seed{seed}" / name
        measured = out / "converted" / f"seed{seed}" / f"{name}.json"
        t0 = time.perf_counter()
        if measured.is_file() and model_dir.is_dir():
            done = json.loads(measured.read_text())
        else:
            converted = convert_variant(source, variant, init, calibration if init == "lsq" else None)
            converted = with_rotary_values(converted, rv)
            metrics = _evaluate(resolved, converted)
            save_model(converted, model_dir, tokenizer)
            done = {"metrics": metrics, "wall_s": round(time.perf_counter() - t0, 3)}
            atomic_write_json(measured, done)
        value = done["metrics"][metric]
        rows.append({"seed": seed, "variant": variant, "rotary_values": rv, "init": init, "stage": "converted",
                     "fraction": 0.0, "steps": 0, "total_steps": n, metric: value, "run_dir": str(model_dir),
                     "wall_s": done["wall_s"]})
        _say(f"[seed {seed}] {label} {INIT_LABELS[init]}: converted {metric} {value:.4g}")
        for f in spec.fractions:
            steps = _budget_steps(n, f)
            up = RunConfig(task=cfg.task, variant=variant, seed=UPTRAIN_SEED_OFFSET + seed, preset=cfg.preset,
                           init_from=str(model_dir), data_dir=cfg.data_dir, optim=cfg.optim,
                           schedule=dataclasses.replace(cfg.schedule, warmup_steps=min(steps, round(f * w))),
                           train=TrainConfig(steps=steps, batch_size=cfg.train.batch_size, eval_every=0,
                                             checkpoint_every=0, progress=False,
                                             out_dir=str(here / f"{name}-up{_pct(f)}")))
            s = train(up)
            rows.append({"seed": seed, "variant": variant, "rotary_values": rv, "init": init, "stage": "uptrained",
                         "fraction": f, "steps": steps, "total_steps": n + steps, metric: s["final"][metric],
                         "run_dir": s["run_dir"], "wall_s": s["wall_time_s"]})
            _say(f"[seed {seed}] {label} {INIT_LABELS[init]}: +{_pct(f)} % uptraining ({steps} steps) "
                 f"{metric} {s['final'][metric]:.4g}")
    for f in spec.fractions:
        total = n + _budget_steps(n, f)
        model = {**cfg.model, "rotary_values": True} if rv else dict(cfg.model)
        scratch = RunConfig(task=cfg.task, variant=variant, seed=seed, preset=cfg.preset, data_dir=cfg.data_dir,
                            model=model, optim=cfg.optim, schedule=cfg.schedule,
                            train=TrainConfig(steps=total, batch_size=cfg.train.batch_size, eval_every=0,
                                              checkpoint_every=0, progress=False,
                                              out_dir=str(here / f"{_slug(variant, rv)}-scratch{_pct(1 + f)}")))
        s = train(scratch)
        rows.append({"seed": seed, "variant": variant, "rotary_values": rv, "init": None, "stage": "scratch",
                     "fraction": f, "steps": total, "total_steps": total, metric: s["final"][metric],
                     "run_dir": s["run_dir"], "wall_s": s["wall_time_s"]})
        _say(f"[seed {seed}] {label} from scratch, {total} steps: {metric} {s['final'][metric]:.4g}")
    return rows


def _stage(job: tuple) -> list[dict]:
    """One unit of work in a worker process: (threads, stage function name, args)."""
    threads, name, args = job
    if threads:
        torch.set_num_threads(threads)
    return _source_stage(*args) if name == "source" else _variant_stage(*args)


def _run_stages(jobs: list[tuple], workers: int) -> list[dict]:
    if workers <= 1 or len(jobs) <= 1:
        return [row for job in jobs for row in _stage(job)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return [row for rows in pool.map(_stage, jobs) for row in rows]


def run_conversion(spec: ConversionSpec, out: str | Path, force: bool = False, command: str | None = None,
                   jobs: int = 1) -> Result:
    """Run (or resume) the experiment into `out`; writes `out`/conversion.md and conversion.json.

    `jobs` > 1 runs the sources of the seeds, then the (seed, target) units, in that many worker
    processes with cores / jobs torch threads each (results do not depend on it: every run is seeded)."""
    import os

    started = time.perf_counter()
    if any(spec.rotary_values) and spec.source is not None:
        from qkvlab.models.io import saved_model_config

        positions = saved_model_config(spec.source).positions
        check(positions == "rotary", f"targets with rotary values need a rotary source; --source {spec.source} "
              f"has positions={positions!r}")
    out = prepare_out(out, spec, force)
    workers = max(1, jobs)
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None
    rows = _run_stages([(threads, "source", (spec, out, seed)) for seed in spec.seeds], workers)
    rows += _run_stages([(threads, "variant", (spec, out, seed, variant, rv))
                         for seed in spec.seeds for variant, rv in spec.targets()], workers)
    wall = time.perf_counter() - started
    resolved, n, w = _resolved_source(spec, out, spec.seeds[0])
    cfg, metric, higher = resolved.config, resolved.task.metric, resolved.task.higher_is_better
    budget = {"steps": n, "batch_size": cfg.train.batch_size, "lr": cfg.optim.lr, "warmup_steps": w,
              "schedule": cfg.schedule.kind, "task": cfg.task, "preset": cfg.preset,
              "source_variant": resolved.model.variant, "positions": resolved.model.positions}
    cells = aggregate(rows, spec, metric)
    table = markdown_table(cells, spec, metric, higher, budget)
    from qkvlab.train.report import machine

    data = {"experiment": "conversion", "command": command, "spec": spec.to_dict(), "metric": metric,
            "higher_is_better": higher, "budget": budget, "definitions": DEFINITIONS, "machine": machine(),
            "wall_time_s": round(wall, 1), "rows_wall_s": round(sum(r["wall_s"] for r in rows), 1),
            "jobs": workers, "torch_threads": threads or torch.get_num_threads(), "cells": cells, "rows": rows}
    md = document(table, spec, data)
    result = Result(rows=rows, table=table)
    result.json = atomic_write_json(out / "conversion.json", data)
    result.markdown = atomic_write_text(out / "conversion.md", md)
    return result


DEFINITIONS = {
    "converted": "the converted model, untrained, on the held-out split",
    "uptrained": "training continued from the converted weights for fraction x N steps (N: the source's steps), "
                 "same batch and peak lr, cosine over those steps, warmup fraction x the source's warmup, "
                 f"batches drawn with seed {UPTRAIN_SEED_OFFSET} + s",
    "scratch": "the target variant trained from its initialisation (seed s) for (1 + fraction) x N steps: the same "
               "total budget (optimizer steps x batch rows) as the source's training plus the uptraining",
    "lsq": "per merged key/value head, the projection minimising the score error of the source's queries on "
           "calibration windows plus the value error through the output projection (qkvlab/convert.py)",
    "change": "paired by seed: 100 (uptrained - scratch) / scratch, mean over seeds with a 95 % t-interval",
}


def _stats(values: list[float]) -> dict:
    mean = statistics.fmean(values)
    return {"n": len(values), "mean": mean, "std": statistics.stdev(values) if len(values) > 1 else None}


def aggregate(rows: list[dict], spec: ConversionSpec, metric: str) -> list[dict]:
    """One cell per (stage, variant, init, fraction): mean and std over seeds, and for uptrained cells the
    paired change against scratch at the same total budget."""
    from qkvlab.train.stats import paired_change

    def values(**match) -> dict[int, float]:  # rows written before rotary values existed have none: False
        return {r["seed"]: r[metric] for r in rows if all(r.get(k, False) == v for k, v in match.items())}

    cells = []
    source = values(stage="source")
    cells.append({"stage": "source", "variant": next(r["variant"] for r in rows if r["stage"] == "source"),
                  "init": None, "fraction": 0.0, **_stats(list(source.values()))})
    for variant, rv in spec.targets():
        target = {"variant": variant, "rotary_values": rv}
        for init in spec.inits_for(variant):
            got = values(stage="converted", init=init, **target)
            change = paired_change(got, source)
            cells.append({"stage": "converted", **target, "init": init, "fraction": 0.0,
                          **_stats(list(got.values())), "change_vs_source": change.mean, "ci95": change.ci95})
            for f in spec.fractions:
                got = values(stage="uptrained", init=init, fraction=f, **target)
                change = paired_change(got, values(stage="scratch", fraction=f, **target))
                cells.append({"stage": "uptrained", **target, "init": init, "fraction": f,
                              **_stats(list(got.values())), "change_vs_scratch": change.mean, "ci95": change.ci95})
        for f in spec.fractions:
            got = values(stage="scratch", fraction=f, **target)
            cells.append({"stage": "scratch", **target, "init": None, "fraction": f, **_stats(list(got.values()))})
    return cells


def _num(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 1000 else f"{x:.4g}"


def _cell(c: dict | None, key: str | None = None) -> str:
    if c is None:
        return "–"
    text = _num(c["mean"]) + (f" ± {_num(c['std'])}" if c["std"] is not None else "")
    if key is not None and c.get(key) is not None:
        text += f" ({c[key]:+.1f} %" + (f" [{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}]" if c.get("ci95") else "") + ")"
    return text


def markdown_table(cells: list[dict], spec: ConversionSpec, metric: str, higher: bool, budget: dict) -> str:
    """The table: one row per (variant, init) and a scratch row per variant; columns converted, then uptrained."""
    def find(**match):
        return next((c for c in cells if all(c.get(k) == v for k, v in match.items())), None)

    n = budget["steps"]
    head = ["target", "initialisation", "converted (+0 steps)"]
    head += [f"+{_pct(f)} % uptraining (+{_budget_steps(n, f)} steps)" for f in spec.fractions]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    src = find(stage="source")
    lines.append("| " + " | ".join([f"{src['variant']} (source, {n} steps)", "–", _cell(src)]
                                   + ["–"] * len(spec.fractions)) + " |")
    for variant, rv in spec.targets():
        target, label = {"variant": variant, "rotary_values": rv}, target_label(variant, rv)
        for init in spec.inits_for(variant):
            row = [label, INIT_LABELS[init], _cell(find(stage="converted", init=init, **target))]
            row += [_cell(find(stage="uptrained", init=init, fraction=f, **target), "change_vs_scratch")
                    for f in spec.fractions]
            lines.append("| " + " | ".join(row) + " |")
        row = [label, "from scratch, same total steps", "–"]
        row += [_cell(find(stage="scratch", fraction=f, **target)) + f" ({n + _budget_steps(n, f)} steps)"
                for f in spec.fractions]
        lines.append("| " + " | ".join(row) + " |")
    better = "higher" if higher else "lower"
    return "\n".join(lines) + (f"\n\n{metric} ({better} is better), mean ± std over seeds "
                               f"{', '.join(map(str, spec.seeds))}; in brackets the paired change against the "
                               "from-scratch row at the same total budget, with its 95 % t-interval.")


def document(table: str, spec: ConversionSpec, data: dict) -> str:
    b, m = data["budget"], data["machine"]
    lines = [
        f"# Conversion: {b['task']} ({b['preset']} preset), {b['source_variant']} to "
        f"{', '.join(target_label(v, rv) for v, rv in spec.targets())}",
        "",
        table,
        "",
        f"- command: `{data['command']}`" if data["command"] else "- command: not recorded",
        f"- source budget N: {b['steps']} steps x {b['batch_size']} rows, peak lr {b['lr']:g}, "
        f"{b['schedule']} schedule, warmup {b['warmup_steps']}",
        f"- machine: {m['cpu']}, {m['cores']} cores" + (f", {m['gpu']}" if m["gpu"] else ", no GPU")
        + f", torch {m['torch']}; {data['jobs']} process(es) x {data['torch_threads']} torch threads; wall time "
        f"of the command "
        f"{data['wall_time_s']:.0f} s (training and evaluation summed over rows: {data['rows_wall_s']:.0f} s)",
        f"- calibration for lsq: {spec.calibration_windows} training windows per seed",
        f"- positions: {b.get('positions', 'as the preset')}"
        + ("; rotary values: the converted weights with values turned by their positions "
           "(`qkvlab.convert.with_rotary_values`), uptrained and trained from scratch that way"
           if any(spec.rotary_values) else ""),
        "",
        "Definitions:",
        "",
    ]
    lines += [f"- **{k}**: {v}" for k, v in DEFINITIONS.items()]
    return "\n".join(lines) + "\n"
