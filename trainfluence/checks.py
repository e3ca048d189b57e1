"""Finiteness checks where values are produced (weights, inputs, losses, gradients, Hessian-vector products,
s_test, scores): one cheap reduction each, and a one-line :class:`NonFiniteError` naming where the value appeared
and the likely fix — so NaN or Inf never travels on into a ranking or a report."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import UserError


class NonFiniteError(UserError):
    """A NaN or Inf appeared in a computed value."""


def all_finite(value: Any) -> bool:
    if hasattr(value, "isfinite"):  # a torch tensor
        return bool(value.isfinite().all())
    return bool(np.isfinite(np.asarray(value)).all())


def require_finite(value: Any, what: str, fix: str) -> Any:
    """Return ``value`` when every entry is finite; otherwise raise naming ``what`` and ``fix``."""
    if not all_finite(value):
        raise NonFiniteError(f"non-finite values (NaN or Inf) in {what}: {fix}")
    return value


FIX_MODEL = "the model gives NaN/Inf here — check the checkpoint (retrain with a lower --lr) and the inputs"
FIX_SOLVE = "the solve diverged — raise --damping, or use --solver exact or cg"
