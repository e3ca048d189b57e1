"""``arnoldi``: a low-rank inverse from the top eigenpairs of H (Schioppa et al. 2022, "Scaling up influence
functions").  ``scipy.sparse.linalg.eigsh`` (ARPACK's implicitly restarted Lanczos, the symmetric Arnoldi
method) on the HVP operator gives the r largest eigenvalues μⱼ of H = ∇²L + λI and eigenvectors uⱼ; then

    H⁻¹ v ≈ Σⱼ uⱼ (uⱼᵀ v) / μⱼ        (directions outside the top-r subspace are dropped).

Once the eigenpairs are known every further right-hand side — and every self-influence ‖diag(μ)^{-1/2} Uᵀ g‖²
— costs one small matrix product.  With r ≥ p − 1 (full rank; ARPACK needs r < p) a dense eigendecomposition is
used instead, which makes the result exact.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh

from ..hvp import HessianOperator
from ..settings.influence import ArnoldiSettings
from .base import EigenSolver


class ArnoldiSolver(EigenSolver):
    name = "arnoldi"

    def __init__(self, settings: ArnoldiSettings | None = None):
        super().__init__(settings or ArnoldiSettings())
        self.hvp_calls = 0

    def compute_eigenpairs(self, op: HessianOperator) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-r eigenvalues μ (descending) and eigenvectors U [p, r] of H (damping included); only the positive
        ones are kept."""
        r = self.settings.rank
        if r >= op.dim - 1:
            evals, evecs = torch.linalg.eigh(op.dense())
            evals, evecs = evals.flip(0)[:r], evecs.flip(1)[:, :r]
            self.hvp_calls = op.dim
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
            self.hvp_calls = count[0]
        keep = evals > 0
        return evals[keep], evecs[:, keep]
