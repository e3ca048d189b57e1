"""Progress bars (tqdm, on stderr): shown when stderr is a terminal.  ``TRAINFLUENCE_PROGRESS=1`` forces
them on (e.g. into a log file), ``TRAINFLUENCE_PROGRESS=0`` off."""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable

from tqdm import tqdm


def enabled() -> bool:
    setting = os.environ.get("TRAINFLUENCE_PROGRESS")
    if setting is not None:
        return setting != "0"
    return sys.stderr.isatty()


def bar(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar that respects ``TRAINFLUENCE_PROGRESS`` (checked at call time) and clears itself when done.
    ``disable=True`` from the caller still disables it."""
    kwargs["disable"] = bool(kwargs.get("disable", False)) or not enabled()
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def write(message: str) -> None:
    """Print a line without breaking an active bar."""
    tqdm.write(message)
