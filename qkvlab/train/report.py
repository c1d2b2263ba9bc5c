"""The study's report from a directory of runs: ``report.md``, ``report.json`` and ``plots/*.png``.

Runs are grouped per task by their full resolved config (``config.yaml``) without the seed, the
variant and runtime-only keys: runs that differ in anything else are never pooled; a group other
than a task's main one gets its own table, named by the keys that differ. Within a group, each
variant's final metric is summarised over seeds (mean ± sample std) and compared with QKV seed by
seed (`qkvlab.train.stats`): the mean per-seed percentage change and its 95 % t-interval.
Only ``summary.json``, ``config.yaml``, ``metrics.jsonl`` and (for the analysis and the model
sizes) the runs' latest checkpoints are read. Runs that cannot be read are listed, never dropped
silently.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkvlab.atomic import atomic_write_text, write_error
from qkvlab.errors import QkvlabError, check
from qkvlab.train.metrics import read_metrics
from qkvlab.train.runs import CONFIG, FINISHED, METRICS, SUMMARY
from qkvlab.train.stats import PairedChange, mean_std, paired_change
from qkvlab.variants import PAPER_VARIANTS, parse_variant

REPORT = "report.md"
PLOTS = "plots"
BASELINE = "QKV"
INPUT_FILES = (SUMMARY, CONFIG, METRICS, "train.log")  # what the report reads: never a destination
_FAMILIES = ("synthetic", "vision", "anomaly", "segmentation", "lm")
_REQUIRED = {"status": str, "task": str, "variant": str, "metric": str}
_NOT_GROUPED = frozenset({"seed", "variant", "model.variant", "train.out_dir"})


# --- reading runs ----------------------------------------------------------------------

@dataclass(frozen=True)
class Skipped:
    run_dir: Path
    reason: str


def _read_summary(path: Path) -> dict:
    """The summary at `path`, validated; raises QkvlabError naming the file and what is wrong."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise QkvlabError(f"{str(path)!r} is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise QkvlabError(f"{str(path)!r} is not valid JSON ({err.msg}, line {err.lineno})") from None
    except OSError as err:
        raise QkvlabError(f"{str(path)!r} cannot be read: {err.strerror or err}") from None
    check(isinstance(data, dict), f"{str(path)!r} holds a JSON {type(data).__name__}, not an object (a run summary)")
    missing = [k for k, t in _REQUIRED.items() if not isinstance(data.get(k), t)]
    check(not missing, f"{str(path)!r} lacks the field(s) {', '.join(missing)} of a run summary")
    if data["status"] in FINISHED:
        check(isinstance(data.get("final"), dict), f"{str(path)!r} lacks the field 'final' (a mapping of metrics)")
    return data


def _read_config(path: Path) -> dict | None:
    import yaml

    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise QkvlabError(f"{str(path)!r} cannot be read: {str(err).splitlines()[0]}") from None
    check(isinstance(data, dict), f"{str(path)!r} is not a run config (a YAML mapping)")
    return data


def scan(root: str | Path) -> tuple[list[dict], list[Skipped]]:
    """Finished runs under `root` (summaries with "run_dir" and "config") and the runs that were skipped, with why."""
    root = Path(root)
    dirs = sorted({p.parent for name in (SUMMARY, CONFIG) for p in root.rglob(name)
                   if not any(part.startswith(".") for part in p.relative_to(root).parts)})
    found, skipped = [], []
    for run_dir in dirs:
        if not (run_dir / SUMMARY).is_file():
            skipped.append(Skipped(run_dir, "unfinished (no summary.json)"))
            continue
        try:
            summary = _read_summary(run_dir / SUMMARY)
            config = _read_config(run_dir / CONFIG)
        except QkvlabError as err:
            skipped.append(Skipped(run_dir, str(err)))
            continue
        if summary["status"] not in FINISHED:
            error = str(summary.get("error", "")).splitlines()[:1]
            skipped.append(Skipped(run_dir, f"status {summary['status']!r}" + (f": {error[0]}" if error else "")))
            continue
        found.append({**summary, "run_dir": run_dir, "config": config})
    return found, skipped


def collect(root: str | Path) -> list[dict]:
    """The summaries of finished runs under `root` (each with its "run_dir" and "config")."""
    return scan(root)[0]


def skipped_message(root: str | Path, skipped: list[Skipped]) -> str:
    """One line: how many runs were skipped, the first few with their reasons."""
    shown = "; ".join(f"{_rel(s.run_dir, root)}: {s.reason}" for s in skipped[:3])
    more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return (f"{len(skipped)} run(s) under {str(root)!r} cannot be reported: {shown}{more} "
            "(finish or remove them, or pass --allow-missing)")


def _rel(path: Path, root: str | Path) -> str:
    try:
        return str(Path(path).relative_to(root)) or "."
    except ValueError:
        return str(path)


# --- grouping and statistics -----------------------------------------------------------

def _flat_config(config: dict | None) -> dict:
    from qkvlab.train.config import RUNTIME_KEYS, flatten

    if config is None:
        return {}
    return {k: v for k, v in flatten(config).items() if k not in RUNTIME_KEYS and k not in _NOT_GROUPED}


def _group_key(flat: dict) -> tuple:
    return tuple(sorted((k, json.dumps(v, sort_keys=True, default=str)) for k, v in flat.items()))


@dataclass
class Row:
    """One variant of one config group, aggregated over seeds."""

    variant: str
    seeds: dict[int, float] = field(default_factory=dict)  # seed -> final metric of each finished seed
    diverged: int = 0
    params: int | None = None
    cache_fraction: float | None = None
    wall_time_s: float = 0.0
    run_dirs: list[Path] = field(default_factory=list)
    change: PairedChange | None = None  # vs QKV of the same group, paired by seed

    @property
    def values(self) -> list[float]:
        return [self.seeds[s] for s in sorted(self.seeds)]

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def mean(self) -> float:
        m, _ = mean_std(self.values)
        return math.nan if m is None else m

    @property
    def std(self) -> float:
        _, s = mean_std(self.values)
        return math.nan if s is None else s


@dataclass
class TaskTable:
    """The runs of one task with one config (seeds pooled, variants side by side)."""

    task: str
    family: str
    metric: str
    higher_is_better: bool
    steps: int | None
    rows: dict[str, Row] = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # flattened, without seed/variant/runtime keys
    differs: list[str] = field(default_factory=list)  # "key: main -> this" vs the task's main group
    eval_examples: int | None = None
    eval_fraction: float | None = None  # of the held-out split, when the task evaluated on part of it
    hyper: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The task, or "task [key=value, ...]" for a group whose config differs from the task's main one."""
        if not self.differs:
            return self.task
        return f"{self.task} [{', '.join(d.split(': ')[0] + '=' + d.split(' -> ')[-1] for d in self.differs)}]"

    def relative(self, variant: str) -> float:
        """Mean per-seed change vs QKV as a fraction (0.031 = +3.1 %); NaN without a paired QKV seed."""
        change = self.rows[variant].change
        return math.nan if change is None or change.mean is None else change.mean / 100

    def ordered(self) -> list[Row]:
        return [self.rows[v] for v in sorted(self.rows, key=_variant_order)]


def _variant_order(name: str) -> tuple[int, str]:
    return (PAPER_VARIANTS.index(name), name) if name in PAPER_VARIANTS else (len(PAPER_VARIANTS), name)


def _differences(main: dict, other: dict) -> list[str]:
    def shown(flat: dict, k: str) -> str:
        return repr(flat[k]) if k in flat else "unset"

    return [f"{k}: {shown(main, k)} -> {shown(other, k)}"
            for k in sorted(set(main) | set(other)) if main.get(k) != other.get(k)]


def aggregate(summaries: list[dict]) -> list[TaskTable]:
    """Tables ordered by family, task, then group: one per (task, config without seed and variant)."""
    by_task: dict[str, dict[tuple, list[dict]]] = defaultdict(lambda: defaultdict(list))
    flats: dict[tuple, dict] = {}
    for s in summaries:
        flat = _flat_config(s.get("config"))
        if flat.get("train.dtype") == "auto" and s.get("precision"):
            flat["train.dtype"] = s["precision"]  # what "auto" resolved to where the run trained
        key = _group_key(flat)
        flats[key] = flat
        by_task[s["task"]][key].append(s)
    tables = []
    def has_qkv(runs: list[dict]) -> bool:
        return any(parse_variant(r["variant"]).name == BASELINE for r in runs)

    for groups in by_task.values():
        main = max(groups, key=lambda k: (len(groups[k]), has_qkv(groups[k]), k))
        for key in sorted(groups, key=lambda k: (k != main, k)):
            table = _table(groups[key], flats[key])
            table.differs = [] if key == main else _differences(flats[main], flats[key])
            tables.append(table)
    family_rank = {f: i for i, f in enumerate(_FAMILIES)}
    return sorted(tables, key=lambda t: (family_rank.get(t.family, len(_FAMILIES)), t.task, bool(t.differs), t.name))


def _table(runs: list[dict], flat: dict) -> TaskTable:
    first = runs[0]
    table = TaskTable(first["task"], str(first.get("family", "")), first["metric"],
                      bool(first.get("higher_is_better", True)), first.get("steps"), config=flat)
    examples: Counter[int] = Counter()
    for s in sorted(runs, key=lambda r: (r["variant"], r.get("seed", 0))):
        variant = parse_variant(s["variant"]).name
        row = table.rows.setdefault(variant, Row(variant))
        row.params, row.cache_fraction = s.get("params"), s.get("cache_fraction")
        row.wall_time_s += float(s.get("wall_time_s") or 0.0)
        row.run_dirs.append(Path(s["run_dir"]))
        final = s.get("final") or {}
        value = final.get(table.metric)
        n_eval = final.get("eval_examples")
        if isinstance(n_eval, (int, float)) and math.isfinite(n_eval) and n_eval > 0:  # logged as a float metric
            examples[int(round(n_eval))] += 1
        if s["status"] == "diverged" or not isinstance(value, (int, float)) or not math.isfinite(value):
            row.diverged += 1
        else:
            seed = int(s.get("seed", len(row.seeds)))
            row.seeds[seed] = float(value)
    table.eval_examples = examples.most_common(1)[0][0] if examples else None
    fractions = [f["eval_fraction"] for f in (r.get("final") or {} for r in runs)
                 if isinstance(f.get("eval_fraction"), (int, float))]
    table.eval_fraction = min(fractions) if fractions else None
    base = table.rows.get(BASELINE)
    for row in table.rows.values():
        if base is not None and row.variant != BASELINE:
            row.change = paired_change(row.seeds, base.seeds)
    table.hyper = _hyperparameters(table)
    return table


def _hyperparameters(table: TaskTable) -> dict:
    """Layers, width, heads, context from a run's saved model; steps, batch, lr, warmup from the config."""
    cfg, out = table.config, dict[str, Any]()
    out.update(steps=cfg.get("train.steps", table.steps), batch=cfg.get("train.batch_size"), lr=cfg.get("optim.lr"),
               warmup=cfg.get("schedule.warmup_steps"), precision=cfg.get("train.dtype"))
    rows = table.ordered()
    model = _saved_model_config(rows[0].run_dirs[0]) if rows else None
    if model:
        out.update(layers=model.get("n_layers"), d_model=model.get("d_model"), heads=model.get("n_heads"),
                   input=(f"{model.get('image_size')}px images" if model.get("kind") == "vit"
                          else f"{model.get('max_seq_len')} tokens"))
    return out


def _saved_model_config(run_dir: Path) -> dict | None:
    try:
        from safetensors import safe_open

        from qkvlab.models.io import CONFIG_KEY, weights_file

        with safe_open(str(weights_file(run_dir)), framework="pt") as f:
            return json.loads((f.metadata() or {})[CONFIG_KEY])
    except Exception:  # no checkpoint, or not a qkvlab model: sizes are shown as unknown
        return None


# --- analysis of the trained models ----------------------------------------------------

@dataclass
class Analysis:
    layers: dict[str, list[list[dict]]] = field(default_factory=dict)  # variant -> per run -> per-layer stats
    batch: int = 0
    error: str | None = None


def analyze_table(table: TaskTable, batch: int = 8, tasks: dict | None = None) -> Analysis:
    """Q/K/V similarity, ranks and score asymmetry of every run's final model on a held-out batch of its task."""
    from qkvlab.analysis import held_out_inputs, projection_similarity
    from qkvlab.models.io import load_model
    from qkvlab.train.runs import load_task

    result, tasks = Analysis(batch=batch), {} if tasks is None else tasks
    for row in table.ordered():
        for run_dir in row.run_dirs:
            try:
                model = load_model(run_dir)
                name, data_dir = table.config.get("task", table.task), table.config.get("data_dir")
                if (name, data_dir) not in tasks:
                    tasks[(name, data_dir)] = load_task(name, data_dir)
                args, kwargs = held_out_inputs(model, tasks[(name, data_dir)], batch)
                layers = projection_similarity(model, *args, **kwargs)
            except Exception as err:  # the report stays useful without the analysis; the reason is shown
                result.error = result.error or f"{_rel(run_dir, run_dir.parents[2])}: {str(err).splitlines()[0][:200]}"
                continue
            if layers:
                result.layers.setdefault(row.variant, []).append(layers)
    if not result.layers and result.error is None:
        result.error = "no attention layers found"
    return result


def _analysis_means(runs: list[list[dict]], key: str) -> float:
    vals = [layer[key] for run in runs for layer in run if not math.isnan(layer.get(key, math.nan))]
    return statistics.fmean(vals) if vals else math.nan


# --- formatting ------------------------------------------------------------------------

def _num(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "–"
    return f"{x:.4f}" if abs(x) < 10 else f"{x:.2f}" if abs(x) < 1000 else f"{x:.4g}"


def _pct(x: float, signed: bool = True) -> str:
    if x is None or math.isnan(x):
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


def _ci_cells(row: Row, has_baseline: bool) -> tuple[str, str]:
    """(95 % CI, verdict) cells of a row."""
    if row.variant == BASELINE:
        return "baseline", ""
    change = row.change
    if not has_baseline or change is None or change.n == 0:
        return "–", "n/a (no paired QKV seed)"
    if change.ci95 is None:
        return "–", "n/a (1 seed)"
    lo, hi = change.ci95
    verdict = "**beyond seed noise**" if change.distinguishable else "within seed noise"
    return f"[{lo:+.1f}, {hi:+.1f}] %", f"{verdict} ({change.n} seeds)"


def task_markdown(table: TaskTable) -> str:
    direction = "higher is better" if table.higher_is_better else "lower is better"
    seeds = sorted({r.n + r.diverged for r in table.rows.values()})
    examples = (f"evaluated on {table.eval_examples:,} held-out examples" if table.eval_examples
                else "evaluation size not recorded")
    if table.eval_fraction is not None and table.eval_fraction < 1:
        examples += f" ({table.eval_fraction * 100:.1f} % of the split)"
    lines = [f"## {table.name}", ""]
    if table.differs:
        lines += [f"Not pooled with the main `{table.task}` runs: their configs differ in "
                  + "; ".join(f"`{d}`" for d in table.differs) + ".", ""]
    lines += [f"{table.family or 'task'} · metric **{table.metric}** ({direction}) · {examples} · "
              f"seeds per variant: {', '.join(map(str, seeds))}", ""]
    h = table.hyper
    lines += ["| layers | d_model | heads | input | steps | batch | peak lr | warmup | precision | params (QKV) |",
              "|---|---|---|---|---|---|---|---|---|---|",
              "| " + " | ".join(str(h.get(k)) if h.get(k) is not None else "–"
                               for k in ("layers", "d_model", "heads", "input", "steps", "batch", "lr", "warmup",
                                         "precision"))
              + f" | {_count(table.rows[BASELINE].params) if BASELINE in table.rows else '–'} |", ""]
    has_base = BASELINE in table.rows and bool(table.rows[BASELINE].seeds)
    lines += [f"| variant | {table.metric} (mean ± std) | seeds | vs QKV | 95 % CI | vs seed noise | params "
              "| cache reduction |", "|---|---|---|---|---|---|---|---|"]
    for row in table.ordered():
        ci, verdict = _ci_cells(row, has_base)
        rel = "–" if row.variant == BASELINE else _pct(table.relative(row.variant))
        lines.append(f"| {row.variant} | {_cell(row)} | {row.n} | {rel} | {ci} | {verdict} | {_count(row.params)} "
                     f"| {_pct(_reduction(row), signed=False)} |")
    return "\n".join(lines) + "\n"


def analysis_markdown(table: TaskTable, analysis: Analysis) -> str:
    lines = [f"### {table.name}: what the trained models compute", ""]
    if not analysis.layers:
        return "\n".join(lines + [f"Analysis not available: {analysis.error}.", ""])
    lines += [f"Mean over layers and seeds, on one held-out batch of {analysis.batch} examples of the task "
              "(the first batch its evaluation uses). cos: mean cosine similarity of the per-head vectors of the "
              "same token; rank: effective rank of the projection's outputs; asym: ‖S − Sᵀ‖/‖S‖ of the "
              "pre-softmax scores S = QKᵀ/√d (+ pair bias), before masking (0 = symmetric).", "",
              "| variant | runs | cos(K,V) | cos(Q,K) | cos(Q,V) | rank Q | rank K | rank V | asym |",
              "|---|---|---|---|---|---|---|---|---|"]
    for variant in sorted(analysis.layers, key=_variant_order):
        runs = analysis.layers[variant]
        cells = [f"{_analysis_means(runs, k):.3f}" if not math.isnan(_analysis_means(runs, k)) else "–"
                 for k in ("cos_kv", "cos_qk", "cos_qv")]
        cells += [f"{_analysis_means(runs, k):.1f}" for k in ("rank_q", "rank_k", "rank_v")]
        asym = _analysis_means(runs, "asym")
        cells.append("–" if math.isnan(asym) else f"{asym:.3f}")
        lines.append(f"| {variant} | {len(runs)} | " + " | ".join(cells) + " |")
    if analysis.error:
        lines += ["", f"Some runs could not be analysed: {analysis.error}."]
    return "\n".join(lines) + "\n"


def summary_table(tables: list[TaskTable]) -> str:
    """A plain-text table for the terminal: per variant, its cache saving and each task's mean (and change).

    A "*" marks a change whose 95 % paired interval excludes 0.
    """
    variants = sorted({v for t in tables for v in t.rows}, key=_variant_order)
    header = ["variant", "cache saved"] + [f"{t.name} {t.metric[:4]}" for t in tables]
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
            elif v == BASELINE or math.isnan(t.relative(v)):
                cells.append(_num(r.mean))
            else:
                star = "*" if r.change is not None and r.change.distinguishable else ""
                cells.append(f"{_num(r.mean)} ({_pct(t.relative(v))}{star})")
        body.append(cells)
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(c) for c in body])


# --- plots ---------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _savefig(fig, path: Path) -> Path:
    """Write the figure to a temporary file beside `path`, then rename it into place (never a half PNG)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    except OSError as err:  # a full disk: one line, the previous plot stays
        raise write_error(path, err) from None
    finally:
        tmp.unlink(missing_ok=True)
        _pyplot().close(fig)
    return path


def plot_quality_vs_cache(tables: list[TaskTable], path: Path) -> Path:
    """Per table: change vs QKV (mean of paired per-seed changes) against KV-cache reduction; whiskers = 95 % CI."""
    plt = _pyplot()
    n = len(tables)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax, table in zip(axes.flat, tables, strict=False):  # the grid may have spare axes
        placed: dict[tuple[float, str], int] = defaultdict(int)  # points already drawn at each reduction
        for row in table.ordered():
            if row.variant == BASELINE:
                ax.plot(0.0, 0.0, "ks", ms=5)
                ax.annotate(BASELINE, (0, 0), textcoords="offset points", xytext=(4, -10), fontsize=8)
                continue
            rel, red = table.relative(row.variant), _reduction(row)
            if math.isnan(rel) or math.isnan(red):
                continue
            y = rel * 100
            x = red * 100 + 1.5 * sum(1 for k in placed if k[0] == round(red * 100, 1))  # dodge equal reductions
            ci = row.change.ci95 if row.change is not None else None
            yerr = [[y - ci[0]], [ci[1] - y]] if ci else None
            ax.errorbar(x, y, yerr=yerr, fmt="o", mfc=None if ci else "none", capsize=3)
            key = (round(red * 100, 1), row.variant)
            label = row.variant + ("" if ci else " (1 seed)")
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            placed[key] += 1
        ax.axhline(0.0, color="grey", lw=0.8)
        better = "higher" if table.higher_is_better else "lower"
        ax.set(title=f"{table.name} ({table.metric}, {better} is better)", xlabel="KV-cache reduction (%)",
               ylabel=f"{table.metric} change vs QKV (%, 95 % CI)")
        ax.set_xlim(-5, 100)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return _savefig(fig, path)


def _mean_curve(run_dirs: list[Path], split: str, key: str) -> tuple[list[int], list[float]]:
    """Mean over seeds of `key` per step (steps every seed logged)."""
    per_step: dict[int, list[float]] = defaultdict(list)
    for run_dir in run_dirs:
        try:
            records = read_metrics(run_dir / METRICS, split)
        except (OSError, ValueError, QkvlabError):
            continue
        for record in records:
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value) and isinstance(record.get("step"), int):
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

    When the task was evaluated only once, the metric panel shows the final values as dots with ±std whiskers.
    """
    plt = _pyplot()
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    rows = table.ordered()
    evals = {row.variant: _mean_curve(row.run_dirs, "eval", table.metric) for row in rows}
    for row in rows:
        steps, loss = _mean_curve(row.run_dirs, "train", "loss")
        if steps:
            ax_loss.plot(steps, _smooth(loss, max(1, len(loss) // 50)), label=row.variant, lw=1)
    ax_loss.set(title=f"{table.name}: training loss (mean over seeds)", xlabel="step", ylabel="loss")
    if max((len(steps) for steps, _ in evals.values()), default=0) > 1:
        for row in rows:
            steps, metric = evals[row.variant]
            ax_metric.plot(steps, metric, marker=".", label=row.variant, lw=1)
        ax_metric.set(title=f"{table.name}: {table.metric} (held out)", xlabel="step", ylabel=table.metric)
    else:
        shown = [row for row in rows if row.values]
        for i, r in enumerate(shown):
            ax_metric.errorbar(r.mean, i, xerr=r.std if r.n > 1 else None, fmt="o", capsize=3, color=f"C{i}")
        ax_metric.set_yticks(range(len(shown)), [r.variant for r in shown])
        ax_metric.invert_yaxis()
        ax_metric.set(title=f"{table.name}: final {table.metric} (held out, ±std)", xlabel=table.metric)
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
    if ax_loss.get_legend_handles_labels()[0]:
        ax_loss.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _savefig(fig, path)


def plot_analysis(table: TaskTable, analysis: Analysis, path: Path) -> Path:
    """Per layer: cos(K,V), cos(Q,K), cos(Q,V) and score asymmetry, one line per variant (mean over seeds)."""
    plt = _pyplot()
    keys = (("cos_kv", "cos(K,V)"), ("cos_qk", "cos(Q,K)"), ("cos_qv", "cos(Q,V)"), ("asym", "score asymmetry"))
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5))
    variants = sorted(analysis.layers, key=_variant_order)
    width = 0.8 / len(variants)  # variants side by side within a layer, so equal values stay visible
    depth = max(min(len(r) for r in analysis.layers[v]) for v in variants)
    for ax, (key, label) in zip(axes, keys, strict=True):
        for j, variant in enumerate(variants):
            runs = analysis.layers[variant]
            n_layers = min(len(r) for r in runs)
            ys = [statistics.fmean([r[i][key] for r in runs]) for i in range(n_layers)]
            xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(n_layers)]
            if not all(math.isnan(y) for y in ys):
                ax.plot(xs, ys, marker="o", lw=1, label=variant, color=f"C{j % 10}")
        ax.set(title=label, xlabel="layer", xlim=(-0.5, depth - 0.5))
        ax.set_xticks(range(depth))
        ax.set_ylim(-1.05 if key != "asym" else 0, 1.05 if key != "asym" else 2.05)
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    fig.suptitle(f"{table.name}: per layer, held-out batch of {analysis.batch}", fontsize=9)
    fig.tight_layout()
    return _savefig(fig, path)


# --- the report ------------------------------------------------------------------------

def machine() -> dict:
    """CPU model, cores, accelerator, torch and Python versions, OS."""
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version(), "os": platform.platform(terse=True)}


def _finite(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def report_data(tables: list[TaskTable], preset: str | None, wall_s: float | None) -> dict:
    """The machine-readable report (``report.json``): NaN never appears, undefined values are null."""
    tasks = {}
    for t in tables:
        variants = {}
        for row in t.ordered():
            change = row.change
            base = row.variant == BASELINE
            variants[row.variant] = {
                "n_seeds": row.n,
                "mean": _finite(row.mean),
                "std": _finite(row.std),
                "delta_vs_qkv_pct": 0.0 if base and row.n else _finite(change.mean if change else None),
                "ci95_delta_pct": list(change.ci95) if change is not None and change.ci95 is not None else None,
                "params": row.params,
                "cache_reduction": _finite(_reduction(row)),
            }
        tasks[t.name] = {"metric": t.metric, "higher_is_better": t.higher_is_better,
                         "eval_examples": t.eval_examples, "variants": variants}
    return {"preset": preset, "wall_s": _finite(wall_s), "tasks": tasks}


def _common_preset(summaries: list[dict]) -> str | None:
    presets = {s.get("preset") for s in summaries}
    return presets.pop() if len(presets) == 1 else None


def write_report(root: str | Path, out: str | Path | None = None, *, preset: str | None = None,
                 wall_s: float | None = None, command: str | None = None, allow_missing: bool = True,
                 analyze: bool = True, analysis_batch: int = 8) -> Path:
    """Write ``report.md``, ``report.json`` beside it and ``plots/*.png`` for the runs under `root`.

    Runs that cannot be read are listed in the report; with ``allow_missing=False`` they are an error
    (raised before anything is written). Returns the path of ``report.md``.
    """
    root = Path(root)
    check(root.exists(), f"run directory {str(root)!r} does not exist")
    check(root.is_dir(), f"{str(root)!r} is a file, not a directory of runs"
                         + (f" (it is a run's summary; its directory is {str(root.parent)!r})"
                            if root.name == SUMMARY else ""))
    summaries, skipped = scan(root)
    check(allow_missing or not skipped, skipped_message(root, skipped) if skipped else "")
    tables = aggregate(summaries)
    check(len(tables) > 0, f"no finished runs (summary.json) under {str(root)!r}")
    out = Path(out) if out is not None else root / REPORT
    plots = out.parent / PLOTS
    plots.mkdir(parents=True, exist_ok=True)
    quality = plot_quality_vs_cache(tables, plots / "quality_vs_cache.png")

    def slug(t: TaskTable) -> str:
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in t.name)

    n_runs = sum(r.n + r.diverged for t in tables for r in t.rows.values())
    hours = sum(r.wall_time_s for t in tables for r in t.rows.values()) / 3600
    preset = preset if preset is not None else _common_preset(summaries)
    m = machine()
    multi = any(r.n > 1 for t in tables for r in t.rows.values())
    parts = [
        "# Projection sharing: results", "",
        f"- command: `{command}`" if command else "- command: not recorded (written by `qkvlab report`)",
        f"- preset: {preset or 'mixed / unknown'} · wall time of the command: "
        + (f"{wall_s:.0f} s" if wall_s is not None else "not recorded")
        + f" · training time summed over runs: {hours:.2f} h",
        f"- machine: {m['cpu']}, {m['cores']} cores" + (f", {m['gpu']}" if m["gpu"] else ", no GPU")
        + f"; torch {m['torch']}, Python {m['python']}, {m['os']}",
        f"- {n_runs} finished runs in `{root}` over {len({t.task for t in tables})} tasks"
        + (f"; {len(skipped)} run(s) skipped (listed at the end)" if skipped else ""), "",
        "Each cell is the final held-out metric, mean ± sample std over seeds. \"vs QKV\" is the mean over seeds of "
        "the per-seed relative change against the QKV run with the same seed (same data order); its sign is good "
        "or bad as the metric's direction says. The 95 % CI is the Student t-interval of that mean (n − 1 degrees "
        "of freedom); a change is **beyond seed noise** when the interval excludes 0. With one seed there is no "
        "interval: a single run's difference can be noise. Runs whose configs differ in anything but the seed "
        "and the variant are never pooled. Parameters are counted once when tied; the KV-cache reduction is "
        "relative to QKV with the same heads.", "",
        "## Overview", "", "```", summary_table(tables), "```",
        *(["`*`: the 95 % CI of the paired change excludes 0.", ""] if multi else [""]),
        f"![quality vs cache reduction]({quality.relative_to(out.parent)})", "",
        "Whiskers: 95 % CI of the paired change (open markers: one seed, no interval).", "",
    ]
    tasks_cache: dict = {}
    analyses = []
    for table in tables:
        curves = plot_learning_curves(table, plots / f"learning_curves_{slug(table)}.png")
        parts += [task_markdown(table), f"![learning curves]({curves.relative_to(out.parent)})", ""]
        if analyze:
            analysis = analyze_table(table, analysis_batch, tasks_cache)
            analyses.append(analysis_markdown(table, analysis))
            if analysis.layers:
                figure = plot_analysis(table, analysis, plots / f"analysis_{slug(table)}.png")
                analyses.append(f"![per-layer analysis]({figure.relative_to(out.parent)})\n")
    if analyses:
        parts += ["## Analysis: queries, keys, values and score asymmetry", "",
                  "The paper's 300M language model (QKV): cos(K,V) 0.73, cos(Q,K) 0.42, cos(Q,V) 0.31.", ""]
        parts += analyses
    if skipped:
        parts += ["## Skipped runs", ""] + [f"- `{_rel(s.run_dir, root)}`: {s.reason}" for s in skipped] + [""]
    atomic_write_text(out.with_suffix(".json"),
                      json.dumps(report_data(tables, preset, wall_s), indent=1, allow_nan=False) + "\n")
    atomic_write_text(out, "\n".join(parts))
    return out
