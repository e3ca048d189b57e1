"""``exact``: the dense Hessian and its eigendecomposition — the reference for small parameter counts."""

from __future__ import annotations

import torch

from ..errors import UserError
from ..hvp import HessianOperator
from ..settings.influence import ExactSettings
from .base import EigenSolver


class ExactSolver(EigenSolver):
    """H⁻¹V = Q Λ⁻¹ Qᵀ V from the dense H (p Hessian-vector products) and ``torch.linalg.eigh``, reused across
    calls.  H must be positive definite — with a non-convex model raise the damping until it is."""

    name = "exact"

    def __init__(self, settings: ExactSettings | None = None):
        super().__init__(settings or ExactSettings())

    def compute_eigenpairs(self, op: HessianOperator) -> tuple[torch.Tensor, torch.Tensor]:
        if op.dim > self.settings.max_params:
            raise UserError(
                f"the exact solver builds a dense {op.dim}x{op.dim} Hessian; that is above its limit of "
                f"{self.settings.max_params} parameters: use --params last, or solver lissa, cg or arnoldi"
            )
        evals, evecs = torch.linalg.eigh(op.dense())
        if float(evals.min()) <= 0:
            raise UserError(
                f"the damped Hessian is not positive definite (smallest eigenvalue {float(evals.min()):.3g}): "
                f"raise --damping above {max(0.0, -float(evals.min()) + op.damping):.3g}"
            )
        return evals.flip(0), evecs.flip(1)
