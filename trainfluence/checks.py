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
    """True when no entry is NaN or ±Inf.  A sum is one fast reduction (a NaN or Inf makes it non-finite); only when
    it is not finite — a NaN, an Inf, or an overflow of huge finite values — is every entry checked."""
    if hasattr(value, "isfinite"):  # a torch tensor
        if value.numel() == 0 or bool(value.sum().isfinite()) if value.is_floating_point() else True:
            return True
        return bool(value.isfinite().all())
    array = np.asarray(value)
    if array.size == 0 or not np.issubdtype(array.dtype, np.inexact):
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(array.sum()):
            return True
    return bool(np.isfinite(array).all())


def require_finite(value: Any, what: str, fix: str) -> Any:
    """Return ``value`` when every entry is finite; otherwise raise naming ``what`` and ``fix``."""
    if not all_finite(value):
        raise NonFiniteError(f"non-finite values (NaN or Inf) in {what}: {fix}")
    return value


FIX_MODEL = "the model gives NaN/Inf here — check the checkpoint (retrain with a lower --lr) and the inputs"
FIX_SOLVE = "the solve diverged — raise --damping, or use --solver exact or cg"
