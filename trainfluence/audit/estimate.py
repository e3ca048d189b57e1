"""How many labels to review: the noise rate and each class pair's flip rate, by confident learning.

Confident learning (Northcutt, Jiang & Chuang 2021), written with numpy.  Given labels ỹ and predicted
probabilities p (n × K) that were not fit to memorise the labels:

1. per-class thresholds  t_j = mean of p_j(x) over the examples labelled j  (the model's average self-confidence);
2. the confident joint   C[i, j] = #{x : ỹ = i, j = argmax_{k : p_k(x) ≥ t_k} p_k(x)}  (examples with no class
   above its threshold are not counted);
3. calibrated            Q[i, j] = C[i, j] / Σ_k C[i, k] · n_i / n,  n_i = #{ỹ = i}  (rows sum to the label prior);
4. the noise rate        ρ = Σ_{i≠j} Q[i, j]   — the suggested number to review is round(ρ · n);
   the flip rate of the pair (true j → given i) is P(true = j | given = i) = Q[i, j] / Σ_k Q[i, k].

Refused above one half (:data:`MAX_CREDIBLE_RATE`): the count is then 0 (no suggested cut) and ``refusal`` says
why.  ρ counts the labels the model confidently disagrees with, wrong or not yet learnt; with more than half of
some class's labels wrong the model learns the wrong majority, so such a rate is not what confident learning can
measure, and a model that has not learnt the classes gives the same count.  Seen in ``demo --quick`` (1,500
shapes, 10% planted, 8 epochs, 75% training accuracy at the end): every epoch's estimate was 0.16–0.80, still
falling at the last, and the steadiest was the second epoch's 0.78 — before the model had learnt.

Which probabilities: confident learning needs probabilities that did not memorise the labels (cleanlab gets them
by cross-validation, K extra trainings).  The audit uses the training dynamics instead: each epoch's minibatch
probabilities (before that example's step), at the epoch where the per-epoch estimate levels off
(:func:`least_memorised_epoch`) — free; within 2 points of the planted rate for uniform and asymmetric noise in the
benchmark, and like cleanlab's cross-validated estimate, far under it for instance-dependent noise (BENCHMARKS.md
"bench:mislabel").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


MAX_CREDIBLE_RATE = 0.5  # above this the estimate is refused (module docstring)


@dataclass
class NoiseEstimate:
    rate: float  # estimated fraction of wrong labels (as measured, also when refused)
    count: int  # round(rate · n): how many of the ranking to review; 0 when refused
    joint: np.ndarray  # [K, K] Q[given, true], sums to 1
    flagged: np.ndarray  # [n] bool: counted off the diagonal (confidently another class than the given one)
    refusal: str = ""  # why no cut is suggested ('' when the estimate stands)

    def flip_rates(self) -> np.ndarray:
        """[K, K]: P(true = j | given = i) (rows sum to 1 where the class occurs)."""
        rows = self.joint.sum(1, keepdims=True)
        return np.divide(self.joint, rows, out=np.zeros_like(self.joint), where=rows > 0)

    def top_pairs(self, classes: list[str], limit: int = 10) -> list[dict[str, object]]:
        """The largest off-diagonal entries: given label, likely true label, examples, share of the given class."""
        q = self.joint.copy()
        np.fill_diagonal(q, 0)
        n = self.count / self.rate if self.rate > 0 else 0
        rates = self.flip_rates()
        order = np.argsort(-q, axis=None, kind="stable")[:limit]
        return [{"given": classes[i], "true": classes[j], "examples": int(round(q[i, j] * n)),
                 "share_of_given": float(rates[i, j])}
                for i, j in (np.unravel_index(o, q.shape) for o in order) if q[i, j] > 0]


def estimate_noise(labels: np.ndarray, probs: np.ndarray) -> NoiseEstimate:
    """Confident-learning estimate of the label-noise rate (module docstring)."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    n, k = probs.shape
    if labels.shape != (n,) or n == 0:
        raise ValueError(f"labels {labels.shape} must match probabilities {probs.shape}")
    prior = np.bincount(labels, minlength=k).astype(np.float64)
    thresholds = np.array([probs[labels == j, j].mean() if prior[j] else np.inf for j in range(k)])
    above = probs >= thresholds[None, :]
    confident = np.where(above, probs, -np.inf)
    counted = above.any(1)
    guess = confident.argmax(1)
    joint = np.zeros((k, k))
    np.add.at(joint, (labels[counted], guess[counted]), 1.0)
    rows = joint.sum(1, keepdims=True)
    joint = np.divide(joint, rows, out=np.zeros_like(joint), where=rows > 0) * (prior / n)[:, None]
    rate = float(joint.sum() - np.trace(joint))
    flagged = counted & (guess != labels)
    if rate > MAX_CREDIBLE_RATE:
        refusal = (f"the model confidently disagrees with {rate:.0%} of the labels, more than half: a model that has "
                   "not learnt the classes gives the same count, so no cut is suggested (train longer, then audit "
                   "again; the ranking stands)")
        return NoiseEstimate(rate, 0, joint, flagged, refusal)
    return NoiseEstimate(rate, int(round(rate * n)), joint, flagged)


TAIL_FRACTION = 0.25  # epochs whose estimate fell below this share of the largest (after the first) are memorised


def least_memorised_epoch(labels: np.ndarray, probs_per_epoch: np.ndarray) -> tuple[int, list[float]]:
    """The epoch where the noise estimate is steadiest, relative to its size.  Returns (t, every ρ̂_t).

    A network fits the clean labels first and memorises the wrong ones later (early learning): the estimate from
    each epoch's minibatch probabilities falls fast while the clean labels are learnt (it also flags clean
    examples the model does not know yet), levels off at the noise, and falls again, to zero, as the wrong
    labels are memorised (10% planted, 20 epochs: 0.151, 0.102, 0.099, 0.098, … 0.056 at epoch 11, 0.002 at 20;
    a slow learner, shapes in 5 epochs: 0.71, 0.32, 0.15, 0.11, 0.094).  The plateau is where the relative
    change |ρ̂_{t+1} − ρ̂_{t−1}| / ((steps) · ρ̂_t) is smallest (one-sided at the last epoch), among the epochs
    after the first (untrained) whose estimate has not collapsed below :data:`TAIL_FRACTION` of the largest
    (a memorised tail is steady too)."""
    rates = [estimate_noise(labels, p).rate for p in probs_per_epoch]
    if len(rates) == 1:
        return 0, rates
    r = np.array(rates)
    change = np.full(len(r), np.inf)
    floor = TAIL_FRACTION * r[1:].max()  # below this the estimate has collapsed into the memorised tail
    for t in range(1, len(r)):  # the first epoch's model is untrained
        if r[t] >= floor:
            lo, hi = t - 1, min(t + 1, len(r) - 1)
            change[t] = abs(r[hi] - r[lo]) / ((hi - lo) * max(r[t], 1e-12))
    return int(np.argmin(change)), rates


def suggest_labels(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """For each example the most likely class other than its given label (what to relabel a suspect to)."""
    p = np.array(probs, dtype=np.float64, copy=True)
    p[np.arange(len(labels)), labels] = -np.inf
    return p.argmax(1)


__all__ = ["NoiseEstimate", "estimate_noise", "least_memorised_epoch", "suggest_labels"]
