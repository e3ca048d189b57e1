"""``ekfac`` / ``kfac``: H⁻¹ ≈ P⁻¹ with P the Kronecker-factored Gauss–Newton approximation plus (wd + λ)I
(:mod:`trainfluence.kfac`).  No iterations: the factors are estimated once per operator (two passes over its
examples for EK-FAC, one for K-FAC), then every right-hand side — and every self-influence gᵀP⁻¹g — costs a few
small matrix products.  An approximation of H (block-diagonal, Kronecker-structured), not a solve of it: the
iterative solvers use it as their preconditioner."""

from __future__ import annotations

import torch

from ..hvp import HessianOperator
from ..settings.influence import KroneckerSettings
from .base import SolveReport, Solver


class KroneckerSolver(Solver):
    corrected = True

    def __init__(self, settings: KroneckerSettings | None = None):
        super().__init__(settings or KroneckerSettings())

    def curvature(self, op: HessianOperator):
        kc = op.kronecker(corrected=self.corrected, settings=self.settings)
        self.report = SolveReport(self.name, True, details={"approximation": self.name, "examples": kc.examples, "batch_size": kc.batch_size,
                                                            **self.settings.output_curvature(),
                                                            "output_directions_per_batch": round(kc.directions, 2), "kronecker_layers": [layer.module for layer in kc.layers],
                                                            "diagonal_parameters": list(kc.diagonal)})
        return kc

    def inverse_hvp(self, op: HessianOperator, V: torch.Tensor) -> torch.Tensor:
        return self.curvature(op).solve(V.to(op.theta), op.shift).to(V.dtype)

    def quadratic_form(self, op: HessianOperator, G: torch.Tensor) -> torch.Tensor:
        return self.curvature(op).whiten(G.to(op.theta), op.shift).pow(2).sum(1)

    def factored(self, op: HessianOperator):
        return self.curvature(op)


class EkfacSolver(KroneckerSolver):
    name = "ekfac"
    corrected = True


class KfacSolver(KroneckerSolver):
    name = "kfac"
    corrected = False
