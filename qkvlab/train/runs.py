"""Where a run lives on disk, what state it is in, and how its task is found.

Layout: ``ROOT/<task>/<variant-slug>/seed<k>/`` holding ``config.yaml`` (the resolved config),
``metrics.jsonl``, ``checkpoints/step_<n>/`` and, once it ends, ``summary.json``.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

from qkvlab.errors import QkvlabError
from qkvlab.atomic import atomic_write_text
from qkvlab.variants import parse_variant

SUMMARY = "summary.json"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
# A finished run is never re-run by a sweep; "failed" (a crash) is retried.
FINISHED = ("done", "diverged")


def variant_slug(variant: str) -> str:
    """A filesystem-safe directory name for a variant: "Q=X/GQA-2" -> "Q=X_GQA-2"."""
    name = parse_variant(variant).name
    return re.sub(r"[^A-Za-z0-9=+\-.]", "_", name)


def run_dir_for(root: str | Path, task: str, variant: str, seed: int) -> Path:
    return Path(root) / re.sub(r"[^A-Za-z0-9_.\-]", "_", task) / variant_slug(variant) / f"seed{seed}"


def read_summary(run_dir: str | Path) -> dict | None:
    """The run's summary, or None when it has none (never started, or interrupted)."""
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_summary(run_dir: str | Path, summary: dict) -> Path:
    return atomic_write_text(Path(run_dir) / SUMMARY, json.dumps(summary, indent=2, sort_keys=False) + "\n")


def run_status(run_dir: str | Path) -> str:
    """"done", "diverged", "failed", "partial" (checkpoints but no summary) or "new"."""
    summary = read_summary(run_dir)
    if summary is not None:
        return str(summary.get("status", "failed"))
    if any((Path(run_dir) / "checkpoints").glob("step_*")):
        return "partial"
    return "new"


def load_task(name: str, data_dir: str | None = None):
    """A task by registered name, or by import path "package.module:TaskClass" (instantiated without arguments)."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise QkvlabError(f"task {name!r} cannot be imported: {err}") from None
        return obj() if isinstance(obj, type) else obj
    from qkvlab.tasks.registry import get_task

    return get_task(name, data_dir=data_dir)
