"""``exact``: the dense H and its eigendecomposition — the reference, for models whose H fits in memory."""

from __future__ import annotations

import os

import torch

from ..errors import UserError
from ..hvp import HessianOperator
from ..linalg import symmetric_eigh
from ..settings.influence import ExactSettings
from .base import EigenSolver

BYTES_PER_ENTRY = 24  # float64 H, its eigenvectors and LAPACK's workspace


def available_memory() -> int:
    """Bytes of memory available now (Linux: MemAvailable; elsewhere the free physical pages)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class ExactSolver(EigenSolver):
    """H⁻¹V = Q Λ⁻¹ Qᵀ V from the dense H (p curvature-vector products) and its eigendecomposition
    (:func:`~trainfluence.linalg.symmetric_eigh`), reused across calls.  Refused only when it would not fit: the
    dense solve needs about 24·p² bytes (H, its eigenvectors and LAPACK's workspace in float64), checked against
    ``max_memory_gb`` (default 80% of the memory available now).
    H must be positive definite — with the Hessian of a non-convex model raise the damping until it is."""

    name = "exact"

    def __init__(self, settings: ExactSettings | None = None):
        super().__init__(settings or ExactSettings())

    def compute_eigenpairs(self, op: HessianOperator) -> tuple[torch.Tensor, torch.Tensor]:
        need = BYTES_PER_ENTRY * op.dim**2
        limit = self.settings.max_memory_gb * 2**30 if self.settings.max_memory_gb else 0.8 * available_memory()
        if need > limit:
            raise UserError(
                f"the exact solver needs about {need / 2**30:.1f} GiB for a dense {op.dim:,}x{op.dim:,} H, above the "
                f"{limit / 2**30:.1f} GiB it may use: use --params last (fewer parameters), --solver cg, lissa or "
                "ekfac, or raise --exact-max-memory-gb"
            )
        evals, evecs = symmetric_eigh(op.dense())
        if float(evals.min()) <= 0:
            raise UserError(
                f"the damped curvature is not positive definite (smallest eigenvalue {float(evals.min()):.3g}): "
                f"raise --damping above {max(0.0, -float(evals.min()) + op.damping):.3g}"
            )
        return evals.flip(0), evecs.flip(1)
