"""``cg``: conjugate gradients (``scipy.sparse.linalg.cg``) on a ``LinearOperator`` of Hessian-vector products."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, cg

from ..hvp import HessianOperator
from ..progress import bar
from .base import Solver


@dataclass
class CGSettings:
    rtol: float = 1e-6  # stop when ‖H x − v‖ ≤ rtol ‖v‖
    maxiter: int = 500


class CGSolver(Solver):
    """Solves H x = v for each right-hand side; each iteration is one full-data HVP.  Needs H positive definite."""

    name = "cg"

    def __init__(self, settings: CGSettings | None = None):
        super().__init__(settings or CGSettings())

    def inverse_hvp(self, op: HessianOperator, V: torch.Tensor) -> torch.Tensor:
        dtype = op.theta.dtype

        def matvec(v: np.ndarray) -> np.ndarray:
            return op.hvp(torch.as_tensor(v, dtype=dtype)[None])[0].double().cpu().numpy()

        A = LinearOperator((op.dim, op.dim), matvec=matvec, dtype=np.float64)
        out, self.trace = [], []
        for v in bar(V, desc="cg", unit="rhs", disable=len(V) < 2):
            iterations = [0]
            b = v.double().cpu().numpy()

            def count(_xk: np.ndarray) -> None:
                iterations[0] += 1

            x, info = cg(A, b, rtol=self.settings.rtol, maxiter=self.settings.maxiter, callback=count)
            self.trace.append({"iterations": iterations[0], "converged": info == 0,
                               "relative_residual": float(np.linalg.norm(matvec(x) - b) / max(np.linalg.norm(b), 1e-30))})
            out.append(torch.as_tensor(x, dtype=V.dtype))
        return torch.stack(out).to(V.device)
