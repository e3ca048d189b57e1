"""``exact``: the dense Hessian and a direct solve — the reference for small parameter counts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from ..hvp import HessianOperator
from .base import Solver


@dataclass
class ExactSettings:
    max_params: int = 6000  # refuse above this many parameters (a dense p×p float64 matrix)


class ExactSolver(Solver):
    """H⁻¹V by an eigendecomposition of the dense H (built from p Hessian-vector products; reused across calls).

    H must be positive definite — with a non-convex model raise the damping until it is."""

    name = "exact"

    def __init__(self, settings: ExactSettings | None = None):
        super().__init__(settings or ExactSettings())
        self._eig: tuple[torch.Tensor, torch.Tensor] | None = None
        self._op_id: int | None = None

    def eigendecomposition(self, op: HessianOperator) -> tuple[torch.Tensor, torch.Tensor]:
        if op.dim > self.settings.max_params:
            raise UserError(
                f"the exact solver builds a dense {op.dim}x{op.dim} Hessian; that is above its limit of "
                f"{self.settings.max_params} parameters: use --params last, or solver lissa, cg or arnoldi"
            )
        if self._eig is None or self._op_id != id(op):
            evals, evecs = torch.linalg.eigh(op.dense())
            if float(evals.min()) <= 0:
                raise UserError(
                    f"the damped Hessian is not positive definite (smallest eigenvalue {float(evals.min()):.3g}): "
                    f"raise --damping above {max(0.0, -float(evals.min()) + op.damping):.3g}"
                )
            self._eig, self._op_id = (evals, evecs), id(op)
        return self._eig

    def inverse_hvp(self, op: HessianOperator, V: torch.Tensor) -> torch.Tensor:
        evals, evecs = self.eigendecomposition(op)
        Vd = V.to(evecs)
        out = ((Vd @ evecs) / evals) @ evecs.T
        self.trace = [{"min_eigenvalue": float(evals.min()), "max_eigenvalue": float(evals.max())}]
        return out.to(V.dtype)

    def whiten(self, op: HessianOperator, G: torch.Tensor) -> torch.Tensor:
        """Λ^{-1/2} Qᵀ g for each row g of G (H = QΛQᵀ): its squared norm is gᵀH⁻¹g."""
        evals, evecs = self.eigendecomposition(op)
        return ((G.to(evecs) @ evecs) / evals.sqrt()).to(G.dtype)
