"""``arnoldi``: the top eigenpairs of H (Schioppa et al. 2022, "Scaling up influence functions").
``scipy.sparse.linalg.eigsh`` (ARPACK's implicitly restarted Lanczos, the symmetric Arnoldi method) on the
curvature-vector product gives the r largest eigenvalues μⱼ of H = C + (wd + λ)I and eigenvectors uⱼ; then

    H⁻¹ v ≈ Σⱼ uⱼ (uⱼᵀ v) / μⱼ + (v − U Uᵀ v) / c,

c the mean of the eigenvalues not kept: (trace H − Σⱼ μⱼ) / (p − r), the trace measured exactly for the
Gauss–Newton matrix (EK-FAC's eigenvalues keep every block's trace); with the Hessian as curvature c = μ_r, an
upper bound.  Dropping the other directions outright (Schioppa et al.'s form) discards what matters most in H⁻¹
— the low-curvature directions, where 1/μ is largest: on MNIST logistic regression rank 50 scored LDS 0.25 that
way and 0.64 with the complement; exact is 0.91 (BENCHMARKS.md).

``rank="auto"`` (default) doubles r from 64 until μ_r ≤ 2(wd + λ) — every direction not kept then has an
eigenvalue within a factor 2 of c — or ``max_rank`` is reached, or the rank whose Lanczos basis (2r vectors of p
float64 numbers) would pass 1 GiB.  Once the eigenpairs are known, every further
right-hand side — and every self-influence — costs one small matrix product.  With r ≥ p/4 (when the dense H
fits in half the memory available) or r ≥ p − 1 (ARPACK needs r < p) a dense eigendecomposition is used instead:
ARPACK with that many vectors is slower than ``eigh``, and the dense route is exact.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh

from ..hvp import HessianOperator
from ..linalg import symmetric_eigh
from ..settings.influence import ArnoldiSettings
from .base import EigenSolver, SolveReport
from .exact import BYTES_PER_ENTRY, available_memory

FIRST_AUTO_RANK = 64
BASIS_BYTES = 1 << 30  # ARPACK keeps about 2r Lanczos vectors of p float64 numbers


class ArnoldiSolver(EigenSolver):
    name = "arnoldi"

    def __init__(self, settings: ArnoldiSettings | None = None):
        super().__init__(settings or ArnoldiSettings())
        self.hvp_calls = 0

    def _top(self, op: HessianOperator, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        dense_fits = BYTES_PER_ENTRY * op.dim**2 <= 0.5 * available_memory()
        if r >= op.dim - 1 or (r >= op.dim // 4 and dense_fits):  # ARPACK with k ~ p/4 is slower than eigh
            evals, evecs = symmetric_eigh(op.dense())
            self.hvp_calls += op.dim
            return evals.flip(0)[:r], evecs.flip(1)[:, :r]

        def matvec(v: np.ndarray) -> np.ndarray:
            self.hvp_calls += 1
            return op.hvp(torch.as_tensor(np.ravel(v), dtype=op.theta.dtype)[None])[0].double().cpu().numpy()

        A = LinearOperator((op.dim, op.dim), matvec=matvec, dtype=np.float64)
        v0 = np.random.default_rng(self.settings.seed).normal(size=op.dim)
        vals, vecs = eigsh(A, k=r, which="LA", tol=self.settings.tol, maxiter=self.settings.maxiter, v0=v0)
        order = np.argsort(vals)[::-1]
        return torch.as_tensor(vals[order].copy()), torch.as_tensor(vecs[:, order].copy())

    def compute_eigenpairs(self, op: HessianOperator) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-r eigenvalues μ (descending, positive) and eigenvectors U [p, r] of H, and the complement c."""
        st = self.settings
        self.hvp_calls = 0
        if st.rank == "auto":
            cap = max(1, min(st.max_rank, op.dim, BASIS_BYTES // (16 * op.dim)))
            r = min(FIRST_AUTO_RANK, cap)
            while True:
                evals, evecs = self._top(op, r)
                if float(evals[-1]) <= 2 * op.shift or r >= cap:
                    break
                r = min(2 * r, cap)
        else:
            evals, evecs = self._top(op, min(int(st.rank), op.dim))
        keep = evals > 0
        evals, evecs = evals[keep], evecs[:, keep]
        rest = op.dim - len(evals)
        if rest > 0:
            if op.curvature == "ggn":
                trace = float(op.kronecker(corrected=True).eigenvalues().sum()) + op.dim * op.shift
                self.complement = max((trace - float(evals.sum())) / rest, op.shift)
            else:
                self.complement = float(evals[-1])
        else:
            self.complement = None
        self.report_details = {"rank": len(evals), "smallest_kept_eigenvalue": float(evals[-1]),
                               "complement": self.complement, "hvp_calls": self.hvp_calls}
        return evals, evecs

    def eigenpairs(self, op: HessianOperator) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = super().eigenpairs(op)
        self.report = SolveReport(self.name, True, details={**self.report_details, **self.report.details})
        return pairs
