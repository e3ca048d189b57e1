"""``cg``: preconditioned conjugate gradients on full-data curvature-vector products.

Every right-hand side runs its own CG (its own step sizes α, β), but all of them advance together, so each
iteration is one vectorised product H D for the rows still above tolerance.  The preconditioner (EK-FAC by
default) makes the start P⁻¹g already close and the iterations few.  Converged when ‖H x − g‖ ≤ rtol ‖g‖ for every
row, checked with one more product at the end (the true residual, not the recurrence's).  H must be positive
definite: with ``--curvature hessian`` on a deep net raise the damping above its most negative eigenvalue.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..hvp import HessianOperator
from ..progress import bar
from ..settings.influence import CGSettings
from .base import SolveReport, Solver, preconditioner


class CGSolver(Solver):
    name = "cg"
    advice = "raise --cg-maxiter, raise --damping (a better-conditioned H), or use --solver exact"

    def __init__(self, settings: CGSettings | None = None):
        super().__init__(settings or CGSettings())

    def inverse_hvp(self, op: HessianOperator, V: torch.Tensor) -> torch.Tensor:
        st = self.settings
        V = V.to(op.theta)
        P = preconditioner(op, st.preconditioner)
        vnorm = V.norm(dim=1).clamp_min(1e-30)
        X = P(V)
        R = V - op.hvp(X)
        Z = P(R)
        D = Z.clone()
        rz = (R * Z).sum(1)
        iterations = torch.zeros(len(V), dtype=torch.long)
        pbar = bar(range(st.maxiter), desc="cg", unit="it")
        for _ in pbar:
            active = torch.nonzero(R.norm(dim=1) / vnorm > st.rtol).flatten()
            if len(active) == 0:
                break
            HD = op.hvp(D[active])
            curvature = (D[active] * HD).sum(1)
            if bool((curvature <= 0).any()):
                raise UserError("cg met a direction of non-positive curvature: H + λI is not positive definite — raise "
                                f"--damping (now {op.damping:g}) or use --curvature ggn")
            alpha = rz[active] / curvature
            X[active] += alpha[:, None] * D[active]
            R[active] -= alpha[:, None] * HD
            Z = P(R[active])
            rz_new = (R[active] * Z).sum(1)
            D[active] = Z + (rz_new / rz[active])[:, None] * D[active]
            rz[active] = rz_new
            iterations[active] += 1
            pbar.set_postfix(active=len(active), refresh=False)
        pbar.close()
        residual = ((V - op.hvp(X)).norm(dim=1) / vnorm).tolist()
        worst = max(residual)
        # float rounding keeps the true residual a little above the recurrence's: allow it 10× rtol
        self.report = SolveReport(self.name, worst <= 10 * st.rtol, int(iterations.max()), "relative residual", worst,
                                  st.rtol, {"preconditioner": st.preconditioner, "iterations": iterations.tolist(),
                                            "relative_residuals": residual})
        return X
