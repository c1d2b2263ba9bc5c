"""Metrics as JSON lines (one record per log event), mirrored to TensorBoard when it is installed."""

from __future__ import annotations

import errno
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from qkvlab.atomic import atomic_write_text
from qkvlab.train.runs import storing

_KEPT = "the metrics file ends with its last complete record and the run resumes from its last checkpoint"


def read_metrics(path: str | Path, split: str | None = None) -> list[dict]:
    """The records of a metrics file (optionally one split); a line cut short by a crash is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and (split is None or record.get("split") == split):
            records.append(record)
    return records


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Appends ``{"split", "step", "time", ...values}`` records to ``metrics.jsonl``.

    Only the main process writes (`enabled`). On resume, `truncate_after(step)` drops the records
    of steps the checkpoint does not contain, so the file reads as one uninterrupted run. Each
    record is one `write` of a whole line; a write that fails (a full disk) is cut back off the
    file, so the file never ends in a torn line, and becomes a one-line `QkvlabError`.
    """

    def __init__(self, path: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._file: int | None = None  # the open file descriptor, once a record is written
        self._tb: Any = None  # a tensorboard SummaryWriter when tensorboard is installed
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass  # no tensorboard: metrics.jsonl only
            else:
                self._tb = SummaryWriter(log_dir=str(self.path.parent / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Keep only records with ``step <= step`` (and drop a torn last line)."""
        if not self.enabled:
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        with storing(f"metrics {str(self.path)!r}", _KEPT):
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, split: str, step: int, **values: float) -> None:
        if not self.enabled:
            return
        record = {"split": split, "step": step, "time": round(time.time(), 3)}
        record.update({k: _jsonable(v) for k, v in values.items()})
        self._append((json.dumps(record) + "\n").encode("utf-8"))
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{split}/{key}", value, step)

    def _append(self, line: bytes) -> None:
        with storing(f"metrics {str(self.path)!r}", _KEPT):
            if self._file is None:
                self._file = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            end = os.lseek(self._file, 0, os.SEEK_END)
            try:
                written = os.write(self._file, line)
                if written != len(line):
                    raise OSError(errno.ENOSPC, f"short write ({written} of {len(line)} bytes)")
            except OSError:
                os.ftruncate(self._file, end)  # no torn line for the next record to glue onto
                raise

    def close(self) -> None:
        if self._file is not None:
            os.close(self._file)
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
