"""Print rows of dicts as an aligned text table or as JSON, and format sizes for people.

Commands build their rows once with raw values (ints stay exact) and call `emit`; `--json` prints
the same data machine-readably.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction


def human_bytes(n: int) -> str:
    """Binary units: 1536 -> "1.50 KiB", 17179869184 -> "16.00 GiB"."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_count(n: int) -> str:
    """Decimal units: 8030261248 -> "8.03 B", 354823168 -> "354.82 M", 999 -> "999"."""
    for scale, unit in ((10 ** 15, "P"), (10 ** 12, "T"), (10 ** 9, "B"), (10 ** 6, "M"), (10 ** 3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def percent_change(value: float, baseline: float) -> str:
    """"+3.1 %", "-50.0 %", "0.0 %" (relative to `baseline`)."""
    change = 100.0 * (value - baseline) / baseline
    return "0.0 %" if abs(change) < 0.05 else f"{change:+.1f} %"


def fraction(num: int, den: int) -> str:
    """"1/2", "1" (reduced)."""
    f = Fraction(num, den)
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def _numeric(values: Iterable) -> bool:
    present = [v for v in values if v is not None and v != ""]
    return bool(present) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present)


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None,
                 headers: dict[str, str] | None = None, formats: dict[str, Callable] | None = None,
                 right: Iterable[str] = ()) -> str:
    """An aligned text table of `rows` (dicts).

    `columns` picks and orders keys (default: the keys of the first row, then new ones in order);
    `headers` renames them; `formats` maps a column to a function value -> str. Columns of numbers,
    and those in `right`, are right-aligned.
    """
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    headers, formats, right = headers or {}, formats or {}, set(right)
    cells = [[(formats[c](row.get(c)) if c in formats and row.get(c) is not None else _cell(row.get(c)))
              for c in columns] for row in rows]
    titles = [headers.get(c, c) for c in columns]
    widths = [max([len(t)] + [len(r[i]) for r in cells]) for i, t in enumerate(titles)]
    align = [c in right or _numeric(row.get(c) for row in rows) for c in columns]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, align, strict=True)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(titles), rule] + [line(r) for r in cells])


def emit(rows: Sequence[dict], as_json: bool = False, *, columns: Sequence[str] | None = None,
         headers: dict[str, str] | None = None, formats: dict[str, Callable] | None = None,
         right: Iterable[str] = (), title: str | None = None, notes: Iterable[str] = (),
         data=None, file=None) -> None:
    """Print `rows` as a table (with an optional title line and notes below) or, with `as_json`,
    print `data` (default: the rows) as JSON."""
    out = file or sys.stdout
    if as_json:
        print(json.dumps(rows if data is None else data, indent=2), file=out)
        return
    if title:
        print(title, file=out)
    print(format_table(rows, columns, headers, formats, right), file=out)
    for note in notes:
        print(note, file=out)
