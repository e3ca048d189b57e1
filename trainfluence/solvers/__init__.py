"""Inverse-HVP solvers: one registry, each with its settings dataclass (:mod:`trainfluence.settings.influence`)
and one ``inverse_hvp(op, V)``; every solve leaves a :class:`SolveReport`.

| name | method | cost |
| --- | --- | --- |
| ``exact`` | dense Hessian + eigendecomposition | p HVPs + O(p³); refuses above a parameter limit |
| ``lissa`` | Koh–Liang stochastic recursion | depth × repeats minibatch HVPs per batch of right-hand sides |
| ``cg`` | ``scipy.sparse.linalg.cg`` | ~√κ full-data HVPs per right-hand side |
| ``arnoldi`` | top-r eigenpairs by ``scipy.sparse.linalg.eigsh`` | O(r) full-data HVPs once, then free |
"""

from __future__ import annotations

from typing import Any

from ..settings.influence import SOLVER_SETTINGS, solver_settings
from .arnoldi import ArnoldiSolver
from .base import EigenSolver, SolveReport, Solver
from .cg import CGSolver
from .exact import ExactSolver
from .lissa import LissaSolver

SOLVERS: dict[str, type[Solver]] = {
    "exact": ExactSolver,
    "lissa": LissaSolver,
    "cg": CGSolver,
    "arnoldi": ArnoldiSolver,
}
assert tuple(SOLVERS) == tuple(SOLVER_SETTINGS), "settings.influence.SOLVER_SETTINGS names the registry"


def make_solver(name: str, settings: Any = None) -> Solver:
    """A solver by name; ``settings`` is its settings dataclass, a dict of its fields, or None (defaults).
    Every setting is validated (a bad value is a one-line error naming its flag)."""
    settings = solver_settings(name, settings)  # raises for an unknown name, naming the known ones
    return SOLVERS[name](settings)


__all__ = ["SOLVERS", "EigenSolver", "SolveReport", "Solver", "make_solver", "ExactSolver", "LissaSolver", "CGSolver",
           "ArnoldiSolver"]
