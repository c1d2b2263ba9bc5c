"""The study's report: the core tables (the sweep report), and one comparison table per experiment.

Every change is paired by seed against QKV *in the same arm* (same context, same size), except the
iso-parameter arm, whose widened models are compared with the task's QKV. Intervals are 95 %
Student t-intervals of the per-seed changes (`qkvlab.train.stats`); a change is beyond seed noise
when its interval excludes 0. Writes `report.md`, `report.json` and `plots/` in the study directory.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from qkvlab.atomic import atomic_write_text
from qkvlab.experiments import context_length, core, iso_parameter, positions, scale
from qkvlab.experiments.plan import PlannedRun, read_plan, slug
from qkvlab.train.report import BASELINE, _pyplot, _savefig, machine, write_report
from qkvlab.train.runs import read_summary
from qkvlab.train.stats import PairedChange, mean_std, paired_change

REPORT = "report.md"
# The paper's figures beside ours (PAPER.md); None where the paper gives none.
PAPER_CONTEXT = {512: 5.4, 2048: 2.2}  # Q-K=V perplexity gap (%) by context length
PAPER_SCALE = {"300M": 3.1, "1.2B": 2.48}  # Q-K=V perplexity gap (%) by model size


@dataclass
class Cell:
    """One (task, arm, variant): its final metric per seed, parameters, metric description."""

    seeds: dict[int, float] = field(default_factory=dict)
    params: int | None = None
    metric: str = ""
    higher_is_better: bool = True

    @property
    def mean(self) -> float | None:
        return mean_std(list(self.seeds.values()))[0]

    @property
    def std(self) -> float | None:
        return mean_std(list(self.seeds.values()))[1]


def collect_cells(runs: list[PlannedRun], experiment: str) -> dict[tuple[str, str, str], Cell]:
    """(task, arm, variant) -> Cell over the finished runs of `experiment`."""
    cells: dict[tuple[str, str, str], Cell] = defaultdict(Cell)
    for p in runs:
        if p.experiment != experiment:
            continue
        summary = read_summary(p.run.run_dir) or {}
        final = summary.get("final") or {}
        metric = summary.get("metric", "")
        value = final.get(metric) if isinstance(final, dict) else None
        cell = cells[(p.run.task, p.arm, p.run.variant)]
        if summary.get("status") == "done" and isinstance(value, (int, float)) and math.isfinite(value):
            cell.seeds[p.run.seed] = float(value)
            cell.params = summary.get("params")
            cell.metric, cell.higher_is_better = metric, bool(summary.get("higher_is_better", True))
    return dict(cells)


def _change(cell: Cell | None, base: Cell | None) -> PairedChange | None:
    if cell is None or base is None or not cell.seeds or not base.seeds:
        return None
    return paired_change(cell.seeds, base.seeds)


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.{digits}g}"


def _value(cell: Cell | None) -> str:
    if cell is None or not cell.seeds:
        return "–"
    return _fmt(cell.mean) + ("" if cell.std is None else f" ± {_fmt(cell.std, 2)}")


def _delta(change: PairedChange | None) -> str:
    if change is None or change.mean is None:
        return "–"
    text = f"{change.mean:+.2f} %"
    if change.ci95 is not None:
        lo, hi = change.ci95
        text += f" [{lo:+.2f}, {hi:+.2f}]" + (" *" if change.distinguishable else "")
    return text


def _change_json(change: PairedChange | None) -> dict:
    if change is None or change.mean is None:
        return {"delta_vs_qkv_pct": None, "ci95_delta_pct": None, "n_pairs": 0}
    return {"delta_vs_qkv_pct": change.mean, "ci95_delta_pct": list(change.ci95) if change.ci95 else None,
            "n_pairs": change.n, "beyond_seed_noise": change.distinguishable}


def _cell_json(cell: Cell | None) -> dict:
    if cell is None:
        return {"n_seeds": 0, "mean": None, "std": None, "params": None}
    return {"n_seeds": len(cell.seeds), "mean": cell.mean, "std": cell.std, "params": cell.params,
            "per_seed": {str(s): v for s, v in sorted(cell.seeds.items())}}


def arm_comparison(cells: dict[tuple[str, str, str], Cell], arms: list[str]) -> tuple[list[str], dict]:
    """Markdown rows and JSON of each arm: QKV, then each variant's paired change vs QKV in that arm."""
    lines: list[str] = []
    data: dict = {}
    for (task, arm, variant), cell in sorted(cells.items(), key=lambda kv: (kv[0][0], arms.index(kv[0][1])
                                                                               if kv[0][1] in arms else 99)):
        if variant != BASELINE:
            continue
        variants = [v for (t, a, v) in cells if (t, a) == (task, arm) and v != BASELINE]
        changes = []  # one cell for every variant: the header has one column for them
        entry = {BASELINE: _cell_json(cell)}
        for v in variants:
            change = _change(cells[(task, arm, v)], cell)
            changes.append(f"{v}: {_value(cells[(task, arm, v)])} ({_delta(change)})")
            entry[v] = {**_cell_json(cells[(task, arm, v)]), **_change_json(change)}
        lines.append("| " + " | ".join([task, arm, _value(cell) + f" ({len(cell.seeds)})", "; ".join(changes)]) + " |")
        data.setdefault(task, {})[arm] = entry
    return lines, data


def plot_gaps(data: dict, arms: list[str], xlabel: str, path: Path, paper: dict | None = None) -> Path:
    """Change vs QKV (%, 95 % CI whiskers) of each variant per arm: dot and whisker, zero line drawn."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for task, by_arm in data.items():
        variants = sorted({v for entry in by_arm.values() for v in entry if v != BASELINE})
        for i, v in enumerate(variants):
            xs, ys, lo, hi = [], [], [], []
            for j, a in enumerate(arms):
                e = by_arm.get(a, {}).get(v)
                if not e or e.get("delta_vs_qkv_pct") is None:
                    continue
                y, ci = e["delta_vs_qkv_pct"], e.get("ci95_delta_pct")
                xs.append(j + 0.08 * (i - (len(variants) - 1) / 2))
                ys.append(y)
                lo.append(y - ci[0] if ci else 0.0)
                hi.append(ci[1] - y if ci else 0.0)
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", capsize=3, label=f"{task}: {v}")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(arms)), arms)
    ax.set(xlabel=xlabel, ylabel="change vs QKV (%, 95 % CI)")
    if paper:
        ax.set_title("paper (Q-K=V): " + ", ".join(f"{k}: +{v} %" for k, v in paper.items()), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _savefig(fig, path)


def _arms_of(runs: list[PlannedRun], experiment: str) -> list[str]:
    arms: list[str] = []
    for p in runs:
        if p.experiment == experiment and p.arm not in arms:
            arms.append(p.arm)
    return arms


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root))


def comparison_section(root: Path, runs: list[PlannedRun], experiment: str, title: str, intro: str,
                       xlabel: str, paper: dict | None) -> tuple[list[str], dict]:
    cells = collect_cells(runs, experiment)
    arms = _arms_of(runs, experiment)
    lines, data = arm_comparison(cells, arms)
    parts = [f"## {title}", "", intro, "",
             "| task | arm | QKV (seeds) | each variant: mean ± std (change vs QKV [95 % CI]) |", "|---|---|---|---|",
             *lines, ""]
    if data:
        plot = plot_gaps(data, arms, xlabel, root / "plots" / f"{slug(experiment)}.png", paper)
        parts += [f"![{experiment}]({_rel(plot, root)})", ""]
    return parts, data


def iso_section(root: Path, runs: list[PlannedRun]) -> tuple[list[str], dict]:
    cells = collect_cells(runs, iso_parameter.NAME)
    same, iso = "same architecture", "iso-parameter"
    parts = ["## Iso-parameter: the saved parameters spent on MLP width", "",
             "Each tied variant with the task's architecture, and with its MLP widened until its parameters are "
             "within 1 % of QKV's; both compared with the same QKV runs, paired by seed.", "",
             "| task | variant | params (same arch.) | change vs QKV | params (iso) | MLP width "
             "| change vs QKV (iso) |",
             "|---|---|---|---|---|---|---|"]
    data: dict = {}
    for (task, arm, variant), cell in sorted(cells.items()):
        if arm != same or variant == BASELINE:
            continue
        base = cells.get((task, same, BASELINE))
        wide = cells.get((task, iso, variant))
        width = next((o.partition("=")[2] for p in runs if p.experiment == iso_parameter.NAME and p.arm == iso
                      and (p.run.task, p.run.variant) == (task, variant)
                      for o in p.run.overrides if o.startswith("model.d_mlp=")), "–")
        c_same, c_iso = _change(cell, base), _change(wide, base)
        ratio = (f" ({100 * (wide.params / base.params - 1):+.2f} %)" if wide and wide.params and base and base.params
                 else "")
        parts.append(f"| {task} | {variant} | {f'{cell.params:,}' if cell.params else '–'} | {_delta(c_same)} | "
                     f"{f'{wide.params:,}' if wide and wide.params else '–'}{ratio} | {width} | {_delta(c_iso)} |")
        data.setdefault(task, {})[variant] = {
            "same_architecture": {**_cell_json(cell), **_change_json(c_same)},
            "iso_parameter": {**_cell_json(wide), **_change_json(c_iso), "d_mlp": width},
        }
        if base is not None:
            data[task][BASELINE] = _cell_json(base)
    return parts + [""], data


def positions_section(root: Path, runs: list[PlannedRun]) -> tuple[list[str], dict]:
    """Each arm's gaps to QKV, then rotary values against plain rotary for each variant, paired by seed."""
    parts, by_arm = comparison_section(
        root, runs, positions.NAME, "Positions: the gap under learned, rotary and rotary-value positions",
        "The same variants and recipe with learned absolute positions, rotary positions, and rotary values (values "
        "turned by their positions, outputs back by the query's: with K = V the cache is stored rotated and its "
        "read rotates nothing).", "positions", None)
    cells = collect_cells(runs, positions.NAME)
    rows: list[str] = []
    cross: dict[str, dict] = {}
    for (task, arm, variant), cell in sorted(cells.items()):
        if arm != positions.ROTARY_VALUES:
            continue
        base = cells.get((task, positions.ROTARY, variant))
        change = _change(cell, base)
        rows.append(f"| {task} | {variant} | {_value(base)} | {_value(cell)} | {_delta(change)} |")
        cross.setdefault(task, {})[variant] = {"rotary": _cell_json(base), "rotary_values": _cell_json(cell),
                                               **_change_json(change)}
    if rows:
        parts += ["Rotary values against plain rotary, the same variant, paired by seed:", "",
                  "| task | variant | rotary | rotary values | change |", "|---|---|---|---|---|", *rows, ""]
    return parts, {"by_arm": by_arm, "rotary_values_vs_rotary": cross}


def write_study_report(root: str | Path, wall_s: float | None = None, command: str | None = None) -> Path:
    """`report.md` + `report.json` for the study directory `root` (from its `plan.json` and run summaries)."""
    root = Path(root)
    runs = read_plan(root)
    (root / "plots").mkdir(exist_ok=True)
    plan_meta = json.loads((root / "plan.json").read_text())
    command = command or plan_meta.get("command")
    m = machine()
    hours = sum(float((read_summary(d) or {}).get("wall_time_s") or 0.0)
                for d in {p.run.run_dir for p in runs}) / 3600
    parts = ["# The study: results", "",
             f"- command: `{command}`" if command else "- command: not recorded",
             f"- wall time of the command: {wall_s:.0f} s ({wall_s / 60:.1f} min)" if wall_s is not None
             else "- wall time: not recorded",
             f"- training time summed over runs: {hours:.2f} h · {len({p.run.run_dir for p in runs})} runs "
             f"· seeds {', '.join(map(str, plan_meta.get('seeds', [])))}",
             f"- machine: {m['cpu']}, {m['cores']} cores" + (f", {m['gpu']}" if m["gpu"] else ", no GPU")
             + f"; torch {m['torch']}, Python {m['python']}", "",
             "Changes are paired by seed against QKV in the same arm; `*` marks a 95 % interval that excludes 0.", ""]
    data: dict = {"preset": plan_meta.get("preset"), "wall_s": wall_s, "experiments": {}}
    experiments = plan_meta.get("experiments", [])
    if core.NAME in experiments and (root / core.NAME).is_dir():
        core_report = write_report(root / core.NAME, preset=plan_meta.get("preset"), command=command)
        core_json = json.loads(core_report.with_suffix(".json").read_text())
        data["experiments"][core.NAME] = core_json
        parts += ["## Core: every variant on every task family", "",
                  f"The full tables, learning curves and the analysis of the trained models (cos(K,V), cos(Q,K), "
                  f"cos(Q,V), effective ranks, score asymmetry, per layer) are in "
                  f"[{_rel(core_report, root)}]({_rel(core_report, root)}).", "",
                  "| task | metric | eval examples | " + " | ".join(["variant: mean (change vs QKV [95 % CI])"]) + " |",
                  "|---|---|---|---|"]
        for task, t in core_json["tasks"].items():
            cells = []
            for v, e in t["variants"].items():
                if v == BASELINE:
                    cells.append(f"QKV {_fmt(e['mean'])}")
                    continue
                ci = e.get("ci95_delta_pct")
                d = e.get("delta_vs_qkv_pct")
                cells.append(f"{v} {_fmt(e['mean'])} ({'–' if d is None else f'{d:+.2f} %'}"
                             + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "") + ")")
            parts.append(f"| {task} | {t['metric']} | {t['eval_examples']} | " + "; ".join(cells) + " |")
        parts.append("")
    if context_length.NAME in experiments:
        section, d = comparison_section(
            root, runs, context_length.NAME, "Context length: the gap at three context lengths",
            "The same model, steps and tokens per step at each context length (the batch shrinks as the context "
            "grows); evaluated on the whole validation text in windows of that length. The paper: Q-K=V +5.4 % "
            "at 512 tokens, +2.2 % at 2,048.", "context length", PAPER_CONTEXT)
        parts += section
        data["experiments"][context_length.NAME] = d
    if scale.NAME in experiments:
        section, d = comparison_section(
            root, runs, scale.NAME, "Scale: the gap at three model sizes",
            "The same recipe at three widths (layers x d_model). The paper: Q-K=V +3.1 % at 300M, +2.48 % at 1.2B.",
            "model size (layers x d_model)", PAPER_SCALE)
        parts += section
        data["experiments"][scale.NAME] = d
    if iso_parameter.NAME in experiments:
        section, d = iso_section(root, runs)
        parts += section
        data["experiments"][iso_parameter.NAME] = d
    if positions.NAME in experiments:
        section, d = positions_section(root, runs)
        parts += section
        data["experiments"][positions.NAME] = d
    if "analysis" in experiments and (root / core.NAME).is_dir():
        from qkvlab.experiments.analysis import write_analysis

        analysis = write_analysis(root / core.NAME, root / "analysis", force=True)
        parts += ["## Analysis of the trained models", "",
                  f"Per variant and per layer, on held-out inputs of each run's task: "
                  f"[{_rel(analysis, root)}]({_rel(analysis, root)}).", ""]
    out = root / REPORT
    atomic_write_text(out.with_suffix(".json"), json.dumps(data, indent=1, default=str) + "\n")
    atomic_write_text(out, "\n".join(parts) + "\n")
    return out
