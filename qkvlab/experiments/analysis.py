"""The analysis experiment: what trained models compute, per variant and per layer.

For every finished run under a directory (a study, `reproduce` or sweep output): cos(K,V), cos(Q,K),
cos(Q,V) of the per-head vectors of the same token, effective ranks of Q, K and V, and the
asymmetry ‖S − Sᵀ‖/‖S‖ of the pre-softmax scores, on held-out inputs of the run's own task
(`qkvlab.analysis`). Tables are per config group (as the report groups runs), averaged over seeds.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from qkvlab.atomic import atomic_write_text
from qkvlab.errors import QkvlabError, check
from qkvlab.experiments.plan import slug
from qkvlab.train.report import _variant_order, aggregate, analyze_table, plot_analysis, scan

KEYS = ("cos_kv", "cos_qk", "cos_qv", "rank_q", "rank_k", "rank_v", "asym")
PAPER = "The paper's 300M language model (QKV): cos(K,V) 0.73, cos(Q,K) 0.42, cos(Q,V) 0.31."


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.fmean(finite) if finite else None


def per_layer(runs: list[list[dict]]) -> list[dict]:
    """Mean over runs (seeds) of each layer's statistics (layers all runs have)."""
    depth = min(len(r) for r in runs)
    return [{"layer": i, "runs": len(runs), **{k: _mean([r[i].get(k, math.nan) for r in runs]) for k in KEYS}}
            for i in range(depth)]


def _cell(x: float | None, digits: int) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def write_analysis(runs_dir: str | Path, out: str | Path | None = None, batch: int = 8, force: bool = False) -> Path:
    """Write `analysis.md`, `analysis.json` and per-layer plots for the runs under `runs_dir`."""
    root = Path(runs_dir)
    check(root.is_dir(), f"{str(root)!r} is not a directory of trained runs")
    target = Path(out) if out is not None else root / "analysis"
    md = target / "analysis.md"
    if md.exists() and not force:
        raise QkvlabError(f"{md} exists; pass --force to replace it, or choose another --out")
    summaries, _ = scan(root)
    tables = aggregate(summaries)
    check(bool(tables), f"no finished runs (summary.json) under {str(root)!r}")
    (target / "plots").mkdir(parents=True, exist_ok=True)
    parts = ["# What the trained models compute", "", PAPER, "",
             f"Runs under `{root}`, each on {batch} held-out examples of its own task; per layer, mean over seeds. "
             "cos: mean cosine similarity of the per-head query/key/value vectors of the same token; rank: effective "
             "rank of the projection's outputs; asym: ‖S − Sᵀ‖/‖S‖ of the pre-softmax scores (0 = symmetric).", ""]
    data: dict = {}
    cache: dict = {}
    for table in tables:
        analysis = analyze_table(table, batch, cache)
        parts += [f"## {table.name}", ""]
        if table.differs:
            parts += ["Config differs from the main runs of the task in " + "; ".join(f"`{d}`" for d in table.differs)
                      + ".", ""]
        if not analysis.layers:
            parts += [f"Not available: {analysis.error}.", ""]
            continue
        parts += ["| variant | layer | runs | cos(K,V) | cos(Q,K) | cos(Q,V) | rank Q | rank K | rank V | asym |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        entry = {}
        for variant in sorted(analysis.layers, key=_variant_order):
            layers = per_layer(analysis.layers[variant])
            entry[variant] = layers
            for row in layers:
                parts.append(f"| {variant} | {row['layer']} | {row['runs']} | "
                             + " | ".join(_cell(row[k], 3) for k in ("cos_kv", "cos_qk", "cos_qv")) + " | "
                             + " | ".join(_cell(row[k], 1) for k in ("rank_q", "rank_k", "rank_v")) + " | "
                             + _cell(row["asym"], 3) + " |")
        figure = plot_analysis(table, analysis, target / "plots" / f"analysis_{slug(table.name)}.png")
        parts += ["", f"![per layer](plots/{figure.name})", ""]
        if analysis.error:
            parts += [f"Some runs could not be analysed: {analysis.error}.", ""]
        data[table.name] = entry
    atomic_write_text(target / "analysis.json", json.dumps({"batch": batch, "tables": data}, indent=1) + "\n")
    atomic_write_text(md, "\n".join(parts) + "\n")
    return md
