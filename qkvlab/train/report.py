"""The study's report from a directory of runs: Markdown tables and matplotlib plots.

Per task, each variant's final metric as mean ± std over seeds (sample std), its relative change
against QKV, its parameter count and KV-cache reduction; plots of quality against cache
reduction and of learning curves. Only the runs' ``summary.json`` and ``metrics.jsonl`` are read.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from qkvlab.errors import check
from qkvlab.atomic import atomic_write_text
from qkvlab.train.metrics import read_metrics
from qkvlab.train.runs import FINISHED, METRICS, SUMMARY, read_summary
from qkvlab.variants import PAPER_VARIANTS, parse_variant

REPORT = "report.md"
PLOTS = "plots"
BASELINE = "QKV"
_FAMILIES = ("synthetic", "vision", "anomaly", "segmentation", "lm")


@dataclass
class Row:
    """One variant of one task, aggregated over seeds."""

    variant: str
    values: list[float] = field(default_factory=list)  # final metric of each finished seed
    diverged: int = 0
    params: int | None = None
    cache_fraction: float | None = None
    wall_time_s: float = 0.0
    run_dirs: list[Path] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else math.nan


@dataclass
class TaskTable:
    task: str
    family: str
    metric: str
    higher_is_better: bool
    steps: int | None
    rows: dict[str, Row] = field(default_factory=dict)

    def relative(self, variant: str) -> float:
        """Relative change of the variant's mean against QKV's (0.031 = +3.1 %); NaN without a baseline."""
        base = self.rows.get(BASELINE)
        if base is None or not base.values or base.mean == 0 or not self.rows[variant].values:
            return math.nan
        return (self.rows[variant].mean - base.mean) / abs(base.mean)

    def ordered(self) -> list[Row]:
        return [self.rows[v] for v in sorted(self.rows, key=_variant_order)]


def _variant_order(name: str) -> tuple[int, str]:
    return (PAPER_VARIANTS.index(name), name) if name in PAPER_VARIANTS else (len(PAPER_VARIANTS), name)


def collect(root: str | Path) -> list[dict]:
    """The summaries of finished runs under `root` (each with its "run_dir")."""
    found = []
    for path in sorted(Path(root).rglob(SUMMARY)):
        summary = read_summary(path.parent)
        if summary is not None and summary.get("status") in FINISHED and "task" in summary:
            found.append({**summary, "run_dir": path.parent})
    return found


def aggregate(summaries: list[dict]) -> list[TaskTable]:
    """One table per task (ordered by family, then name), one row per variant."""
    tables: dict[str, TaskTable] = {}
    for s in summaries:
        table = tables.setdefault(s["task"], TaskTable(s["task"], s.get("family", ""), s.get("metric", ""),
                                                       bool(s.get("higher_is_better", True)), s.get("steps")))
        variant = parse_variant(s["variant"]).name
        row = table.rows.setdefault(variant, Row(variant))
        row.params, row.cache_fraction = s.get("params"), s.get("cache_fraction")
        row.wall_time_s += float(s.get("wall_time_s", 0.0))
        row.run_dirs.append(Path(s["run_dir"]))
        value = s.get("final", {}).get(table.metric)
        if s["status"] == "diverged" or not isinstance(value, (int, float)) or not math.isfinite(value):
            row.diverged += 1
        else:
            row.values.append(float(value))
    family_rank = {f: i for i, f in enumerate(_FAMILIES)}
    return sorted(tables.values(), key=lambda t: (family_rank.get(t.family, len(_FAMILIES)), t.task))


# --- formatting ------------------------------------------------------------------------

def _num(x: float) -> str:
    if math.isnan(x):
        return "–"
    return f"{x:.4f}" if abs(x) < 10 else f"{x:.2f}" if abs(x) < 1000 else f"{x:.4g}"


def _pct(x: float, signed: bool = True) -> str:
    if math.isnan(x):
        return "–"
    return f"{x * 100:+.1f} %" if signed else f"{x * 100:.1f} %"


def _count(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _cell(row: Row) -> str:
    if not row.values:
        return "diverged" if row.diverged else "–"
    text = _num(row.mean) if row.n == 1 else f"{_num(row.mean)} ± {_num(row.std)}"
    return text + (f" ({row.diverged} diverged)" if row.diverged else "")


def _reduction(row: Row) -> float:
    return math.nan if row.cache_fraction is None else 1.0 - row.cache_fraction


def task_markdown(table: TaskTable) -> str:
    direction = "higher is better" if table.higher_is_better else "lower is better"
    seeds = sorted({r.n + r.diverged for r in table.rows.values()})
    lines = [f"## {table.task}", "",
             f"{table.family or 'task'} · metric **{table.metric}** ({direction}) · "
             f"{table.steps or '?'} steps · seeds per variant: {', '.join(map(str, seeds))}", "",
             f"| variant | {table.metric} (mean ± std) | vs QKV | params | KV cache | cache reduction |",
             "|---|---|---|---|---|---|"]
    for row in table.ordered():
        fraction = "–" if row.cache_fraction is None else f"{row.cache_fraction:.4g}"
        lines.append(f"| {row.variant} | {_cell(row)} | {_pct(table.relative(row.variant))} | {_count(row.params)} "
                     f"| {fraction} | {_pct(_reduction(row), signed=False)} |")
    return "\n".join(lines) + "\n"


def summary_table(tables: list[TaskTable]) -> str:
    """A plain-text table for the terminal: per variant, its cache saving and each task's mean (and change)."""
    variants = sorted({v for t in tables for v in t.rows}, key=_variant_order)
    header = ["variant", "cache saved"] + [f"{t.task} {t.metric[:4]}" for t in tables]
    body = []
    for v in variants:
        saved = sorted({round(_reduction(t.rows[v]), 6) for t in tables
                        if v in t.rows and not math.isnan(_reduction(t.rows[v]))})
        shown = "–" if not saved else _pct(saved[0], signed=False)
        if len(saved) > 1:  # head sharing saves more on tasks with more heads
            shown = f"{saved[0] * 100:.0f}-{_pct(saved[-1], signed=False)}"
        cells = [v, shown]
        for t in tables:
            r = t.rows.get(v)
            if r is None or not r.values:
                cells.append("diverged" if r is not None and r.diverged else "–")
            elif v == BASELINE:
                cells.append(_num(r.mean))
            else:
                cells.append(f"{_num(r.mean)} ({_pct(t.relative(v))})")
        body.append(cells)
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(c) for c in body])


# --- plots ---------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_quality_vs_cache(tables: list[TaskTable], path: Path) -> Path:
    """Per task: relative change of the metric vs QKV against the KV-cache reduction, one point per variant."""
    plt = _pyplot()
    n = len(tables)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax, table in zip(axes.flat, tables):
        placed: dict[tuple[float, float], int] = defaultdict(int)  # labels of coinciding points stack up
        for row in table.ordered():
            rel, red = table.relative(row.variant), _reduction(row)
            if math.isnan(rel) or math.isnan(red):
                continue
            base = table.rows[BASELINE].mean
            err = row.std / abs(base) * 100 if row.n > 1 else 0.0
            x, y = red * 100, rel * 100
            ax.errorbar(x, y, yerr=err, fmt="o", capsize=3)
            key = (round(x, 1), round(y, 2))
            ax.annotate(row.variant, (x, y), textcoords="offset points", xytext=(4, 4 + 9 * placed[key]), fontsize=8)
            placed[key] += 1
        ax.axhline(0.0, color="grey", lw=0.8)
        better = "higher" if table.higher_is_better else "lower"
        ax.set(title=f"{table.task} ({table.metric}, {better} is better)", xlabel="KV-cache reduction (%)",
               ylabel=f"{table.metric} change vs QKV (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mean_curve(run_dirs: list[Path], split: str, key: str) -> tuple[list[int], list[float]]:
    """Mean over seeds of `key` per step (steps every seed logged)."""
    per_step: dict[int, list[float]] = defaultdict(list)
    for run_dir in run_dirs:
        for record in read_metrics(run_dir / METRICS, split):
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                per_step[record["step"]].append(float(value))
    steps = sorted(s for s, v in per_step.items() if len(v) == len(run_dirs))
    return steps, [statistics.fmean(per_step[s]) for s in steps]


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` values."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_learning_curves(table: TaskTable, path: Path) -> Path:
    """Training loss (smoothed) and the held-out metric against steps, one line per variant (mean over seeds).

    When the task was evaluated only once, the metric panel shows the final values side by side.
    """
    plt = _pyplot()
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    rows = table.ordered()
    evals = {row.variant: _mean_curve(row.run_dirs, "eval", table.metric) for row in rows}
    for row in rows:
        steps, loss = _mean_curve(row.run_dirs, "train", "loss")
        if steps:
            ax_loss.plot(steps, _smooth(loss, max(1, len(loss) // 50)), label=row.variant, lw=1)
    ax_loss.set(title=f"{table.task}: training loss", xlabel="step", ylabel="loss")
    if max((len(steps) for steps, _ in evals.values()), default=0) > 1:
        for row in rows:
            steps, metric = evals[row.variant]
            ax_metric.plot(steps, metric, marker=".", label=row.variant, lw=1)
        ax_metric.set(title=f"{table.task}: {table.metric} (held out)", xlabel="step", ylabel=table.metric)
    elif any(row.values for row in rows):
        shown = [row for row in rows if row.values]
        ax_metric.barh([r.variant for r in shown], [r.mean for r in shown],
                       xerr=[r.std if r.n > 1 else 0.0 for r in shown], color=[f"C{i}" for i in range(len(shown))])
        ax_metric.invert_yaxis()
        ax_metric.set(title=f"{table.task}: final {table.metric} (held out)", xlabel=table.metric)
        lo, hi = min(r.mean for r in shown), max(r.mean for r in shown)
        pad = (hi - lo) * 0.5 or abs(hi) * 0.05 or 1.0
        ax_metric.set_xlim(lo - pad, hi + pad)
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(root: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.md`` and ``plots/*.png`` for the runs under `root`; returns the report's path."""
    root = Path(root)
    check(root.is_dir(), f"run directory {str(root)!r} does not exist")
    tables = aggregate(collect(root))
    check(len(tables) > 0, f"no finished runs (summary.json) under {str(root)!r}")
    out = Path(out) if out is not None else root / REPORT
    plots = out.parent / PLOTS
    plots.mkdir(parents=True, exist_ok=True)
    quality = plot_quality_vs_cache(tables, plots / "quality_vs_cache.png")
    curves = {t.task: plot_learning_curves(t, plots / f"learning_curves_{t.task}.png") for t in tables}
    n_runs = sum(r.n + r.diverged for t in tables for r in t.rows.values())
    hours = sum(r.wall_time_s for t in tables for r in t.rows.values()) / 3600
    parts = [
        "# Projection sharing: results", "",
        f"{n_runs} finished runs in `{root}` over {len(tables)} tasks ({hours:.2f} h of training). "
        "Each cell is the final held-out metric, mean ± sample std over seeds; \"vs QKV\" is the relative "
        "change of the mean against the QKV baseline (its sign is good or bad as the metric's direction says). "
        "Parameters are counted once when tied; the KV cache is relative to QKV with the same heads.", "",
        "## Overview", "", "```", summary_table(tables), "```", "",
        f"![quality vs cache reduction]({quality.relative_to(out.parent)})", "",
    ]
    for table in tables:
        parts += [task_markdown(table), f"![learning curves]({curves[table.task].relative_to(out.parent)})", ""]
    atomic_write_text(out, "\n".join(parts))
    return out
