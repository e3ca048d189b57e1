"""Inverse-HVP solvers: one registry, each with its settings dataclass (:mod:`trainfluence.settings.influence`)
and one ``inverse_hvp(op, V)`` over all right-hand sides at once; every solve leaves a :class:`SolveReport`.

| name | method | cost |
| --- | --- | --- |
| ``exact`` | dense H + eigendecomposition | p products + O(p³); refused when it would not fit in memory |
| ``cg`` | preconditioned conjugate gradients (EK-FAC) | a few full-data products, until ‖Hx − g‖ ≤ rtol‖g‖ |
| ``lissa`` | preconditioned stochastic recursion, growing batch | minibatch products until the residual is below tol |
| ``ekfac`` / ``kfac`` | Kronecker-factored Gauss–Newton, inverted exactly | two (one) passes over the data, then free |
| ``arnoldi`` | top-r eigenpairs by ``scipy.sparse.linalg.eigsh`` | O(r) full-data products once, then free |
"""

from __future__ import annotations

from typing import Any

from ..settings.influence import SOLVER_SETTINGS, solver_settings
from .arnoldi import ArnoldiSolver
from .base import EigenSolver, SolveReport, Solver, preconditioner
from .cg import CGSolver
from .exact import ExactSolver
from .kronecker import EkfacSolver, KfacSolver
from .lissa import LissaSolver

SOLVERS: dict[str, type[Solver]] = {
    "exact": ExactSolver,
    "lissa": LissaSolver,
    "cg": CGSolver,
    "arnoldi": ArnoldiSolver,
    "ekfac": EkfacSolver,
    "kfac": KfacSolver,
}
assert tuple(SOLVERS) == tuple(SOLVER_SETTINGS), "settings.influence.SOLVER_SETTINGS names the registry"


def make_solver(name: str, settings: Any = None) -> Solver:
    """A solver by name; ``settings`` is its settings dataclass, a dict of its fields, or None (defaults).
    Every setting is validated (a bad value is a one-line error naming its flag)."""
    settings = solver_settings(name, settings)  # raises for an unknown name, naming the known ones
    return SOLVERS[name](settings)


__all__ = ["SOLVERS", "EigenSolver", "SolveReport", "Solver", "make_solver", "preconditioner", "ExactSolver",
           "LissaSolver", "CGSolver", "ArnoldiSolver", "EkfacSolver", "KfacSolver"]
