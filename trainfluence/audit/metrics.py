"""Detection metrics against planted label noise.  Scores: higher = more suspicious; truth: True = flipped.

All functions take numpy arrays, validate them once, and return plain floats or arrays.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

FRACTIONS = (0.05, 0.10, 0.20, 0.30)


def _check(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, truth = np.asarray(scores, dtype=np.float64), np.asarray(truth, dtype=bool)
    if scores.shape != truth.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and truth {truth.shape} must be 1-D and equal in length")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return scores, truth


def ranking(scores: np.ndarray) -> np.ndarray:
    """Indices from most to least suspicious (stable: ties keep dataset order)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def recall_at_fraction(scores: np.ndarray, truth: np.ndarray, fraction: float) -> float:
    """Fraction of the flipped labels among the top round(fraction·n) by score."""
    scores, truth = _check(scores, truth)
    k = int(round(fraction * len(scores)))
    return float(truth[ranking(scores)[:k]].sum() / max(truth.sum(), 1))


def roc_auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """P(score of a random flipped example > a random clean one), ties counting ½ (Mann–Whitney U)."""
    scores, truth = _check(scores, truth)
    pos, neg = int(truth.sum()), int((~truth).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[truth].sum() - pos * (pos + 1) / 2) / (pos * neg))


def average_precision(scores: np.ndarray, truth: np.ndarray) -> float:
    """Σ over distinct score thresholds (descending) of (Rₖ − Rₖ₋₁)·Pₖ — tied scores enter together."""
    scores, truth = _check(scores, truth)
    if truth.sum() == 0:
        return float("nan")
    order = ranking(scores)
    s, t = scores[order], truth[order]
    last_of_group = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(t)[last_of_group]
    seen = np.arange(1, len(s) + 1)[last_of_group]
    recall = tp / truth.sum()
    precision = tp / seen
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def precision_recall_f1_at_k(scores: np.ndarray, truth: np.ndarray, k: int | None = None) -> dict[str, float]:
    """Treat the top k (default: the number flipped) as the predicted mislabels."""
    scores, truth = _check(scores, truth)
    k = int(truth.sum()) if k is None else k
    hits = float(truth[ranking(scores)[:k]].sum())
    precision = hits / k if k else 0.0
    recall = hits / max(truth.sum(), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"k": k, "precision": precision, "recall": recall, "f1": f1}


def recall_curve(scores: np.ndarray, truth: np.ndarray, points: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """Recall of flipped labels vs fraction of the data inspected (in score order)."""
    scores, truth = _check(scores, truth)
    found = np.r_[0, np.cumsum(truth[ranking(scores)])] / max(truth.sum(), 1)
    fractions = np.linspace(0, 1, points)
    return fractions, found[np.round(fractions * len(scores)).astype(int)]


def roc_curve(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold."""
    scores, truth = _check(scores, truth)
    order = ranking(scores)
    s, t = scores[order], truth[order]
    last_of_group = np.r_[s[1:] != s[:-1], True]
    tp = np.r_[0, np.cumsum(t)[last_of_group]]
    fp = np.r_[0, np.cumsum(~t)[last_of_group]]
    return fp / max((~truth).sum(), 1), tp / max(truth.sum(), 1)


def all_metrics(scores: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    out = {f"recall_at_{int(round(f * 100))}pct": recall_at_fraction(scores, truth, f) for f in FRACTIONS}
    out["roc_auc"] = roc_auc(scores, truth)
    out["average_precision"] = average_precision(scores, truth)
    out.update({f"{k}_at_num_flipped": v for k, v in precision_recall_f1_at_k(scores, truth).items() if k != "k"})
    return out
