"""Progress bars (tqdm, on stderr).  Set ``TRAINFLUENCE_PROGRESS=0`` to silence them."""

from __future__ import annotations

import os
from typing import Any, Iterable

from tqdm import tqdm


def enabled() -> bool:
    return os.environ.get("TRAINFLUENCE_PROGRESS", "1") != "0"


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
