"""Where a run lives on disk, what state it is in, and how its task is found.

Layout: ``ROOT/<task>/<variant-slug>/seed<k>/`` holding ``config.yaml`` (the resolved config),
``metrics.jsonl``, ``checkpoints/step_<n>/`` and, once it ends, ``summary.json``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

from qkvlab.atomic import atomic_write_text
from qkvlab.errors import QkvlabError
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


def _load_summary(run_dir: str | Path) -> tuple[dict | None, str | None]:
    """(summary, None), (None, why it is unusable), or (None, None) when there is none."""
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None, "is not valid JSON"
    if not isinstance(data, dict):
        return None, f"holds a {type(data).__name__}, not a mapping"
    if not isinstance(data.get("status"), str):
        return None, "has no status"
    if not isinstance(data.get("final", {}), dict):
        return None, "has a malformed 'final' entry"
    return data, None


def summary_problem(run_dir: str | Path) -> str | None:
    """Why the run's summary.json is unusable ("is not valid JSON", ...), or None (valid or absent)."""
    return _load_summary(run_dir)[1]


def read_summary(run_dir: str | Path) -> dict | None:
    """The run's summary, or None when it has none (never started, interrupted) or it is unusable."""
    return _load_summary(run_dir)[0]


@contextlib.contextmanager
def storing(what: str, kept: str) -> Iterator[None]:
    """Turn an OSError (a full disk, ...) while writing `what` into a one-line error saying what is kept."""
    try:
        yield
    except OSError as err:
        raise QkvlabError(f"could not write {what}: {err.strerror or err}; nothing was lost: {kept}") from None


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
