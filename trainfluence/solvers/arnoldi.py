"""``arnoldi``: a low-rank inverse from the top eigenpairs of H (Schioppa et al. 2022, "Scaling up influence
functions").  ``scipy.sparse.linalg.eigsh`` (ARPACK's implicitly restarted Lanczos, the symmetric Arnoldi
method) on the HVP operator gives the r largest eigenvalues μⱼ of H = ∇²L + λI and eigenvectors uⱼ; then

    H⁻¹ v ≈ Σⱼ uⱼ (uⱼᵀ v) / μⱼ        (directions outside the top-r subspace are dropped).

Once the eigenpairs are known every further right-hand side — and every self-influence ‖diag(μ)^{-1/2} Uᵀ g‖²
— costs one small matrix product.  With r ≥ p − 1 (full rank; ARPACK needs r < p) a dense eigendecomposition is
used instead, which makes the result exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh

from ..errors import UserError
from ..hvp import HessianOperator
from .base import Solver


@dataclass
class ArnoldiSettings:
    rank: int = 50  # number of top eigenpairs kept
    tol: float = 1e-4  # eigsh's relative accuracy of the eigenvalues
    maxiter: int | None = None
    seed: int = 0


class ArnoldiSolver(Solver):
    name = "arnoldi"

    def __init__(self, settings: ArnoldiSettings | None = None):
        super().__init__(settings or ArnoldiSettings())
        self._eig: tuple[torch.Tensor, torch.Tensor] | None = None
        self._op_id: int | None = None

    def eigenpairs(self, op: HessianOperator) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-r eigenvalues μ (descending) and eigenvectors U [p, r] of H (damping included); cached per operator."""
        if self._eig is not None and self._op_id == id(op):
            return self._eig
        r = self.settings.rank
        if r < 1:
            raise UserError(f"the arnoldi rank must be positive, got {r}")
        if r >= op.dim - 1:
            evals, evecs = torch.linalg.eigh(op.dense())
            evals, evecs = evals.flip(0)[:r], evecs.flip(1)[:, :r]
            calls = op.dim
        else:
            count = [0]

            def matvec(v: np.ndarray) -> np.ndarray:
                count[0] += 1
                return op.hvp(torch.as_tensor(np.ravel(v), dtype=op.theta.dtype)[None])[0].double().cpu().numpy()

            A = LinearOperator((op.dim, op.dim), matvec=matvec, dtype=np.float64)
            v0 = np.random.default_rng(self.settings.seed).normal(size=op.dim)
            vals, vecs = eigsh(A, k=r, which="LA", tol=self.settings.tol, maxiter=self.settings.maxiter, v0=v0)
            order = np.argsort(vals)[::-1]
            evals, evecs = torch.as_tensor(vals[order].copy()), torch.as_tensor(vecs[:, order].copy())
            calls = count[0]
        if float(evals.min()) <= 0:
            keep = evals > 0
            evals, evecs = evals[keep], evecs[:, keep]
        if len(evals) == 0:
            raise UserError("the damped Hessian has no positive eigenvalues: raise --damping")
        self.trace = [{"hvp_calls": calls, "eigenvalues": evals.tolist()}]
        self._eig, self._op_id = (evals, evecs), id(op)
        return self._eig

    def inverse_hvp(self, op: HessianOperator, V: torch.Tensor) -> torch.Tensor:
        evals, evecs = self.eigenpairs(op)
        out = ((V.to(evecs) @ evecs) / evals) @ evecs.T
        return out.to(V.dtype).to(V.device)

    def whiten(self, op: HessianOperator, G: torch.Tensor) -> torch.Tensor:
        """diag(μ)^{-1/2} Uᵀ g for each row g of G: ‖·‖² is gᵀH⁻¹g in the low-rank approximation."""
        evals, evecs = self.eigenpairs(op)
        return ((G.to(evecs) @ evecs) / evals.sqrt()).to(G.dtype)
