"""Inverse-HVP solvers: one registry, each with its settings dataclass and one ``inverse_hvp(op, V)``.

| name | method | cost |
| --- | --- | --- |
| ``exact`` | dense Hessian + eigendecomposition | p HVPs + O(p³); refuses above a parameter limit |
| ``lissa`` | Koh–Liang stochastic recursion | depth × repeats minibatch HVPs per batch of right-hand sides |
| ``cg`` | ``scipy.sparse.linalg.cg`` | ~√κ full-data HVPs per right-hand side |
| ``arnoldi`` | top-r eigenpairs by ``scipy.sparse.linalg.eigsh`` | O(r) full-data HVPs once, then free |
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import UserError
from .arnoldi import ArnoldiSettings, ArnoldiSolver
from .base import Solver
from .cg import CGSettings, CGSolver
from .exact import ExactSettings, ExactSolver
from .lissa import LissaSettings, LissaSolver

SOLVERS: dict[str, tuple[type[Solver], type]] = {
    "exact": (ExactSolver, ExactSettings),
    "lissa": (LissaSolver, LissaSettings),
    "cg": (CGSolver, CGSettings),
    "arnoldi": (ArnoldiSolver, ArnoldiSettings),
}


def make_solver(name: str, settings: Any = None, **overrides: Any) -> Solver:
    """A solver by name; ``settings`` is its settings dataclass or a dict, ``overrides`` replace fields."""
    if name not in SOLVERS:
        raise UserError(f"unknown solver {name!r}: use one of {', '.join(SOLVERS)}")
    cls, settings_cls = SOLVERS[name]
    if settings is None:
        settings = settings_cls()
    elif isinstance(settings, dict):
        unknown = set(settings) - {f.name for f in dataclasses.fields(settings_cls)}
        if unknown:
            raise UserError(f"unknown {name} setting(s) {', '.join(sorted(unknown))}")
        settings = settings_cls(**settings)
    if overrides:
        settings = dataclasses.replace(settings, **overrides)
    return cls(settings)  # type: ignore[call-arg]


__all__ = ["SOLVERS", "Solver", "make_solver", "ExactSolver", "LissaSolver", "CGSolver", "ArnoldiSolver"]
