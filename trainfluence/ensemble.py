"""Influence averaged over several models — independently trained ones, or checkpoints of one run:

    I(z, z_test) = (1/M) Σₖ I_k(z, z_test),      each I_k computed by its own :class:`InfluenceEngine`

(with its own gradient store, curvature and s_test, all with the same settings).  Averaging removes much of what
one model's idiosyncrasies put into its scores: TRAK's and dattri's ensembles rest on the same observation, and
BENCHMARKS.md measures it (LDS of 1 model vs 5).  Top-k is taken over the averaged scores, so it is exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .checkpoint import Checkpoint
from .errors import UserError
from .influence import InfluenceEngine, InfluenceTopK
from .solvers import SolveReport
from .store import BuildReport, GradientStore


class EnsembleEngine:
    """The :class:`InfluenceEngine` interface over ``models`` (modules, checkpoints or checkpoint paths); every
    keyword goes to each member's engine."""

    def __init__(self, models: Sequence[nn.Module | Checkpoint | str | Path], train_dataset: Any, **options: Any):
        if len(models) < 1:
            raise UserError("an ensemble needs at least one model")
        self.members = [InfluenceEngine(m, train_dataset, **options) for m in models]
        shapes = {tuple(m.fm.shapes) for m in self.members}
        if len(shapes) > 1:
            raise UserError("the models of an ensemble must share an architecture (their parameters differ in shape)")

    @property
    def first(self) -> InfluenceEngine:
        return self.members[0]

    @property
    def n(self) -> int:
        return self.first.n

    @property
    def device(self) -> torch.device:
        return self.first.device

    @property
    def damping(self) -> float:
        return self.first.damping

    @property
    def store(self) -> GradientStore | None:
        return self.first.store

    @property
    def build_report(self) -> BuildReport | None:
        """Reused only when every member's store was."""
        reports = [m.build_report for m in self.members]
        if any(r is None for r in reports):
            return None
        return reports[0] if all(r.reused for r in reports) else next(r for r in reports if not r.reused)

    @property
    def reports(self) -> list[SolveReport]:
        return [r for m in self.members for r in m.reports]

    def plan(self) -> str:
        """The first member's plan; every member does the same work on its own model."""
        return f"ensemble of {len(self.members)} models, each: " + self.first.plan()

    def describe(self) -> dict[str, Any]:
        return {**self.first.describe(), "ensemble": [m.model_id for m in self.members]}

    def build_cache(self, *, shard: tuple[int, int] = (0, 1)) -> GradientStore:
        for m in self.members:
            m.build_cache(shard=shard)
        return self.first.store  # type: ignore[return-value]

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """The members' softmax probabilities, averaged."""
        return torch.stack([m.predict_proba(x) for m in self.members]).mean(0)

    def influence(self, test: Any) -> np.ndarray:
        return np.mean([m.influence(test) for m in self.members], axis=0)

    def top_k(self, test: Any, top: int = 10, **_search: Any) -> InfluenceTopK:
        """The most helpful and harmful training examples of the averaged scores (exact, over every example)."""
        scores = self.influence(test)
        top = min(top, scores.shape[1])
        helpful = np.argsort(scores, axis=1, kind="stable")[:, :top]
        harmful = np.argsort(-scores, axis=1, kind="stable")[:, :top]
        return InfluenceTopK(helpful, np.take_along_axis(scores, helpful, 1), harmful, np.take_along_axis(scores, harmful, 1))

    def self_influence(self, indices: Any = None, **kwargs: Any) -> np.ndarray:
        return np.mean([m.self_influence(indices, **kwargs) for m in self.members], axis=0)

    def removal_effect(self, test: Any, train_indices: Any) -> tuple[np.ndarray, np.ndarray]:
        """The members' Newton-step removal effects and leverages, averaged."""
        got = [m.removal_effect(test, train_indices) for m in self.members]
        return np.mean([c for c, _ in got], axis=0), np.mean([lev for _, lev in got], axis=0)

    def s_test(self, test: Any) -> torch.Tensor:
        raise UserError("pixel influence (--pixels) needs one model: it is not defined for an ensemble")

    pixel_influence = s_test
