"""Mislabel-audit settings (``trainfluence audit``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from . import NONNEG_INT, POSITIVE_INT, option

#: registered mislabel scores (implemented in :mod:`trainfluence.audit.scores`); the first is the default ranking
SCORE_NAMES = ("fused", "aum", "forgetting", "avg_loss", "tracin", "self_influence", "loss", "margin", "random")
MAX_SHOWN = 1000  # suspects drawn as thumbnails at most (the CSV always lists every example)


@dataclass
class AuditSettings:
    scores: list[str] = option(list(SCORE_NAMES), "scores to compute and compare (the first ranks unless --rank-by)",
                               choices=SCORE_NAMES, flag="score")
    rank_by: str | None = option(None, "score that orders the report; none: the first --score", choices=SCORE_NAMES)
    top: int = option(48, f"suspects shown with thumbnails and label suggestions (at most {MAX_SHOWN})", POSITIVE_INT)
    detail: int = option(6, "top suspects shown with their most helpful and harmful training images", NONNEG_INT)
    related_k: int = option(5, "helpful and harmful training images shown per detailed suspect", POSITIVE_INT)
    fix: int = option(0, "relabel the top K suspects, retrain, compare with random and loss choices (0: skip)",
                      NONNEG_INT)
    tracin_space: str = option("logits", "tracin gradient at the outputs (logits) or over --tracin-params (params)",
                               choices=("logits", "params"))
    tracin_params: str = option("all", "parameters for --tracin-space params")
    tracin_weights: str = option("lr", "weight of each epoch checkpoint in tracin: its mean learning rate (lr) or 1 "
                                 "(uniform)", choices=("lr", "uniform"))
    seed: int = option(0, "seed of the random baseline and the random fix choice", NONNEG_INT)

    def check(self) -> None:
        if not self.scores:
            raise UserError("--score needs at least one score name")
        if self.tracin_space == "logits" and self.tracin_params != "all":
            raise UserError("--tracin-params selects parameters for --tracin-space params; with logits it would be "
                            "ignored: drop it or pass --tracin-space params")
        if self.top > MAX_SHOWN:
            raise UserError(f"--top {self.top} is more than the report can draw ({MAX_SHOWN}); suspects.csv lists every "
                            "example in order")

    @property
    def ranking_score(self) -> str:
        return self.rank_by or self.scores[0]

    @property
    def computed_scores(self) -> list[str]:
        """The scores to compute: ``rank_by`` first when it was not among ``scores``."""
        return self.scores if self.rank_by in (None, *self.scores) else [self.rank_by, *self.scores]
