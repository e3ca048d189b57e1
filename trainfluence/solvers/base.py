"""The solver interface: ``inverse_hvp(op, V)`` = H⁻¹ V for a batch of right-hand sides V [m, p], a
:class:`SolveReport` saying how the last solve ended, and ``quadratic_form(op, G)`` = gᵀ H⁻¹ g per row (the
self-influence), which eigen-solvers compute by whitening.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from ..errors import UserError
from ..hvp import HessianOperator

if TYPE_CHECKING:
    from ..kfac import KroneckerCurvature


@dataclass
class SolveReport:
    """How a solve ended; written beside every result that used it (``influence.json``, ``metrics.json``)."""

    solver: str
    converged: bool
    steps: int = 0  # iterations or recursion steps (the most over the right-hand sides)
    measure: str = ""  # what ``value`` measures, e.g. "relative residual"
    value: float | None = None  # the worst over the right-hand sides
    tolerance: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        if self.converged and "approximation" in self.details:  # ekfac / kfac: no iterations, not the exact H
            d = self.details
            kept = d.get("output_directions_per_batch")
            return (f"{self.solver}: the Kronecker-factored approximation of the curvature from {d['examples']:,} "
                    f"examples, inverted exactly" + (f" ({kept:g} output direction{'' if kept == 1 else 's'} per batch)" if kept else ""))
        if self.converged:
            what = f"{self.measure} {self.value:.3g}" if self.value is not None else "exact"
            return f"{self.solver} converged ({what}{f' after {self.steps} steps' if self.steps else ''})"
        return (f"{self.solver} did not converge: {self.measure} {self.value:.3g} after {self.steps} steps, above its "
                f"tolerance {self.tolerance:.3g}")


@dataclass
class Preconditioner:
    """P ≈ H for the iterative solvers: ``P(V)`` = P⁻¹V, ``inverse_sqrt(V)`` = P^{-1/2}V."""

    solve: Callable[[torch.Tensor], torch.Tensor]
    inverse_sqrt: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        return self.solve(V)


def preconditioner(op: HessianOperator, name: str) -> Preconditioner:
    """``name`` (ekfac | kfac | none) as a :class:`Preconditioner`, P = the Kronecker-factored GGN + (wd + λ)I; the
    factors come from the operator (made once, shared with the ``ekfac`` / ``kfac`` solvers)."""
    if name == "none":
        return Preconditioner(lambda V: V.clone(), lambda V: V.clone())
    kc = op.kronecker(corrected=name == "ekfac")
    return Preconditioner(lambda V: kc.solve(V, op.shift), lambda V: kc.inverse_sqrt(V, op.shift))


class Solver:
    """Subclasses set ``name`` and implement :meth:`inverse_hvp` (and fill ``report``)."""

    name: ClassVar[str] = ""
    advice: ClassVar[str] = ""  # what to change when a solve does not converge

    def __init__(self, settings: Any):
        self.settings = settings
        self.report: SolveReport | None = None

    def inverse_hvp(self, op: HessianOperator, V: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def quadratic_form(self, op: HessianOperator, G: torch.Tensor) -> torch.Tensor:
        """gᵀ H⁻¹ g for each row g of G (float64)."""
        return (self.inverse_hvp(op, G).double() * G.double()).sum(1)

    def factored(self, op: HessianOperator) -> "KroneckerCurvature | None":
        """The Kronecker-factored curvature this solver inverts exactly, whose
        :meth:`~trainfluence.kfac.KroneckerCurvature.example_quadratic_forms` give gᵀH⁻¹g for examples without
        forming their gradients; None for the others (the caller forms G for :meth:`quadratic_form`)."""
        return None


class EigenSolver(Solver):
    """Solvers that invert H through eigenpairs (μⱼ, uⱼ) of the damped H — all of them (``exact``) or the top r
    (``arnoldi``), the rest of the space given one eigenvalue c (the mean of the eigenvalues not kept):

        H⁻¹ v ≈ Σⱼ uⱼ (uⱼᵀ v) / μⱼ + (v − U Uᵀ v) / c.

    The eigenpairs are computed once per operator and reused; gᵀ H⁻¹ g = ‖diag(μ)^{-1/2} Uᵀ g‖² + (‖g‖² − ‖Uᵀg‖²)/c
    costs one small product per example."""

    def __init__(self, settings: Any):
        super().__init__(settings)
        self._cache: tuple[weakref.ref, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.complement: float | None = None  # c, the eigenvalue given to the directions not kept (None: all kept)

    def compute_eigenpairs(self, op: HessianOperator) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def eigenpairs(self, op: HessianOperator) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues μ (descending, all positive) and eigenvectors U [p, r] of H, cached per operator."""
        if self._cache is None or self._cache[0]() is not op:
            evals, evecs = self.compute_eigenpairs(op)
            if len(evals) == 0 or float(evals.min()) <= 0:
                raise UserError(f"the damped Hessian is not positive definite (smallest eigenvalue "
                                f"{float(evals.min()) if len(evals) else float('nan'):.3g}): raise --damping")
            self._cache = (weakref.ref(op), (evals, evecs))
            self.report = SolveReport(self.name, True, details={"rank": len(evals), "largest_eigenvalue": float(evals[0]),
                                                                "smallest_eigenvalue": float(evals[-1])})
        return self._cache[1]

    def inverse_hvp(self, op: HessianOperator, V: torch.Tensor) -> torch.Tensor:
        evals, evecs = self.eigenpairs(op)
        Vd = V.to(evecs)
        coefficients = Vd @ evecs
        out = (coefficients / evals) @ evecs.T
        if self.complement is not None:
            out += (Vd - coefficients @ evecs.T) / self.complement
        return out.to(V.dtype).to(V.device)

    def quadratic_form(self, op: HessianOperator, G: torch.Tensor) -> torch.Tensor:
        evals, evecs = self.eigenpairs(op)
        Gd = G.to(evecs)
        coefficients = Gd @ evecs
        out = (coefficients.pow(2) / evals).sum(1)
        if self.complement is not None:
            out += (Gd.pow(2).sum(1) - coefficients.pow(2).sum(1)).clamp_min(0) / self.complement
        return out
