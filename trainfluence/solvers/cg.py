"""``cg``: conjugate gradients (``scipy.sparse.linalg.cg``) on a ``LinearOperator`` of Hessian-vector products."""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, cg

from ..hvp import HessianOperator
from ..progress import bar
from ..settings.influence import CGSettings
from .base import SolveReport, Solver


class CGSolver(Solver):
    """Solves H x = v for each right-hand side; each iteration is one full-data HVP.  Needs H positive definite.
    The report gives, per solve, the iterations and the relative residual ‖H x − v‖/‖v‖ actually reached."""

    name = "cg"
    advice = "raise --cg-maxiter, raise --damping (a better-conditioned H), or use --solver exact"

    def __init__(self, settings: CGSettings | None = None):
        super().__init__(settings or CGSettings())

    def inverse_hvp(self, op: HessianOperator, V: torch.Tensor) -> torch.Tensor:
        dtype = op.theta.dtype

        def matvec(v: np.ndarray) -> np.ndarray:
            return op.hvp(torch.as_tensor(v, dtype=dtype)[None])[0].double().cpu().numpy()

        A = LinearOperator((op.dim, op.dim), matvec=matvec, dtype=np.float64)
        out, iterations, residuals = [], [], []
        for v in bar(V, desc="cg", unit="rhs", disable=len(V) < 2):
            count = [0]
            b = v.double().cpu().numpy()

            def step(_xk: np.ndarray) -> None:
                count[0] += 1

            x, _info = cg(A, b, rtol=self.settings.rtol, maxiter=self.settings.maxiter, callback=step)
            iterations.append(count[0])
            residuals.append(float(np.linalg.norm(matvec(x) - b) / max(np.linalg.norm(b), 1e-300)))
            out.append(torch.as_tensor(x, dtype=V.dtype))
        worst = max(residuals) if residuals else 0.0
        # scipy's test is on its recurrence residual; judge by the true one, with float rounding's room
        self.report = SolveReport(self.name, worst <= 10 * self.settings.rtol, max(iterations, default=0),
                                  "relative residual", worst, self.settings.rtol,
                                  {"iterations": iterations, "relative_residuals": residuals})
        return torch.stack(out).to(V.device)
