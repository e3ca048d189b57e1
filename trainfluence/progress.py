"""What a run says while it works, on stderr: progress of every long stage, notes and warnings.

``TRAINFLUENCE_PROGRESS`` chooses how progress is shown:

* unset: a tqdm bar when stderr is a terminal; otherwise (a log file, CI) plain lines — for any stage still
  running after 5 s, one line then and one every ``TRAINFLUENCE_PROGRESS_EVERY`` seconds (default 30): stage,
  done/total, elapsed < remaining, rate — so a slow run can be told from a hung one;
* ``1``: bars even when stderr is not a terminal;  ``lines``: the plain lines even on a terminal;  ``0``: nothing.

Notes (``trainfluence: note: …``) and warnings (``trainfluence: warning: …``) are always printed.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Iterable

from tqdm import tqdm


def mode() -> str:
    """``bar``, ``lines`` or ``off`` (see the module docstring)."""
    setting = os.environ.get("TRAINFLUENCE_PROGRESS")
    if setting == "0":
        return "off"
    if setting == "lines":
        return "lines"
    if setting is not None or sys.stderr.isatty():
        return "bar"
    return "lines"


def enabled() -> bool:
    return mode() != "off"


_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Lines:
    """A file for tqdm that turns its carriage-return redraws into whole lines on stderr."""

    def __init__(self) -> None:
        self.last = ""

    def write(self, text: str) -> None:
        line = _ESCAPES.sub("", text.replace("\r", "")).strip()  # tqdm moves the cursor for nested bars
        if line and line != self.last:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
            self.last = line

    def flush(self) -> None:
        sys.stderr.flush()


def bar(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """A tqdm progress display that follows ``TRAINFLUENCE_PROGRESS`` (read at call time) and clears itself when
    done.  ``disable=True`` from the caller still disables it."""
    how = mode()
    kwargs["disable"] = bool(kwargs.get("disable", False)) or how == "off"
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    if how == "lines":
        every = float(os.environ.get("TRAINFLUENCE_PROGRESS_EVERY", "30"))
        kwargs.update(file=_Lines(), mininterval=every, maxinterval=1e9, delay=min(5.0, every), ascii=True,
                      dynamic_ncols=False,
                      bar_format="{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}]")
    return tqdm(iterable, **kwargs)


def write(message: str) -> None:
    """Print a line on stderr without breaking an active bar."""
    tqdm.write(message, file=sys.stderr)


def note(message: str) -> None:
    write(f"trainfluence: note: {message}")


def warn(message: str) -> None:
    write(f"trainfluence: warning: {message}")
