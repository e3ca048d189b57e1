"""CSV files safe to open in a spreadsheet: a text cell that starts with ``= + - @``, a tab or a carriage return
would be read as a formula (CSV injection), so it gets a leading apostrophe; numbers are written as they are."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterable, Sequence

from ..files import write_text

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def cell(value: object) -> object:
    """``value`` ready for a spreadsheet: numbers unchanged, risky text prefixed with ``'``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    text = str(value)
    if text.startswith(_FORMULA_START):
        try:
            float(text)
            return text  # a number written as text, e.g. "-0.25"
        except ValueError:
            return "'" + text
    return text


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> Path:
    """Write a CSV atomically with every cell escaped."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([cell(h) for h in header])
    for row in rows:
        w.writerow([cell(v) for v in row])
    return write_text(path, buf.getvalue())
