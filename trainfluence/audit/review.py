"""The review an audit proposes: a ranking, how many of it to review (the estimated noise count), and a
suggested label for each example — one owner, used by the audit report and by every page that shows training
images (explain grids, the demo), so a suspect is marked the same way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import torch

from ..checkpoint import Checkpoint
from ..data import ImageDataset
from ..settings.audit import AuditSettings
from .estimate import NoiseEstimate, estimate_noise, suggest_labels
from .metrics import ranking
from .scores import SCORES, AuditContext


@dataclass
class Review:
    order: np.ndarray  # example indices, most suspicious first
    estimate: NoiseEstimate  # estimate.count = the suggested cut
    suggested: np.ndarray  # [n] most likely label other than the given one
    suggested_prob: np.ndarray  # [n] its probability
    probabilities: str  # where the label probabilities came from

    @property
    def cut(self) -> np.ndarray:
        return self.order[: self.estimate.count]


def review(ctx: AuditContext, scores: np.ndarray) -> Review:
    """Order by ``scores``.  With the run's training dynamics: the noise estimate of the least memorised epoch
    (:func:`~trainfluence.audit.estimate.least_memorised_epoch`) and labels suggested from the probabilities
    averaged over the epochs (the most accurate suggestions in the benchmark); without: both from the final
    model, which underestimates the noise once it has memorised (said in the report)."""
    if ctx.has_dynamics:
        el = ctx.early_learning
        estimate = el.estimate
        probs = ctx.dynamics.mean_probs()
        source = f"training dynamics, epoch {el.epoch + 1} of {len(el.rates)} (the least memorised)"
    else:
        probs, source = ctx.probs, "final model (no training dynamics: an underestimate if it memorised)"
        estimate = estimate_noise(ctx.labels, probs)
    suggested = suggest_labels(ctx.labels, probs)
    return Review(ranking(scores), estimate, suggested, probs[np.arange(len(suggested)), suggested], source)


def _no_engine():
    raise RuntimeError("the default audit ranking needs no influence engine")


def default_review(ckpt: Checkpoint, train: ImageDataset, device: torch.device | str, arch: str | None = None) -> Review:
    """The review ``trainfluence audit`` would propose at its default ranking (for pages that show training
    images without running the whole audit)."""
    ctx = AuditContext(ckpt, train, torch.device(device), _no_engine, arch=arch)
    return review(ctx, SCORES[AuditSettings().ranking_score](ctx))


def label_marks(train: ImageDataset, rev: Review | None) -> dict[int, dict[str, Any]]:
    """What to print beside a training image: a planted flip (with its original label) and/or a suspect within
    the audit's cut (with its rank and suggested label).  Examples with neither are absent."""
    marks: dict[int, dict[str, Any]] = {}
    if train.noise is not None:
        for i, original in zip(train.noise.indices, train.noise.original_labels):
            marks[int(i)] = {"planted_flip": True, "original_label": train.classes[int(original)]}
    if rev is not None:
        for rank, i in enumerate(rev.cut, start=1):
            marks.setdefault(int(i), {}).update(suspect_rank=rank, suggested_label=train.classes[int(rev.suggested[i])])
    return marks


def mark_text(mark: dict[str, Any] | None, sep: str = "; ") -> str:
    """A short caption for a marked training image ('' when unmarked), its parts joined by ``sep``."""
    if not mark:
        return ""
    parts = []
    if mark.get("planted_flip"):
        parts.append(f"flip (was {mark['original_label']})")
    if "suspect_rank" in mark:
        parts.append(f"suspect → {mark['suggested_label']}")
    return sep.join(parts)


__all__ = ["Review", "default_review", "label_marks", "mark_text", "review"]
