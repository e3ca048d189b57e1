"""The solver interface: one ``inverse_hvp`` over a batch of right-hand sides, H⁻¹ V for V [m, p]."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..hvp import HessianOperator


@dataclass
class SolverSettings:
    """Base of every solver's settings (saved beside cached s_test vectors)."""


@dataclass
class Solver:
    """Subclasses set ``name`` and ``Settings`` and implement :meth:`inverse_hvp`."""

    name: ClassVar[str] = ""
    settings: Any = None
    trace: list[dict[str, Any]] = field(default_factory=list)  # convergence information of the last call

    def inverse_hvp(self, op: HessianOperator, V: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError
