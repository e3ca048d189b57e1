"""Planted label noise: the ground truth for the mislabel audit.

Three kinds (``--noise-kind``), each flipping exactly ``round(rate·n)`` training labels and recording which,
from what, to what (:class:`~trainfluence.data.base.NoiseRecord`):

* ``uniform`` — a uniform random subset; each new label uniform over the K−1 other classes.
* ``asymmetric`` — a uniform random subset; every class y flips to one fixed class m(y), the class whose mean
  image is nearest to y's in pixel space (on MNIST a 7 becomes a 9, a 4 a 9 and a 9 a 4: class-conditional,
  Patrini et al. 2017's setting with the pairs found from the data instead of listed by hand).
* ``instance`` — instance-dependent: a reference model (multinomial logistic regression on the pixels,
  downsampled to at most 1,024 values, fit by L-BFGS) gives each image its runner-up class r(x) = the most
  likely class after the true one; the flipped subset is drawn without replacement with probability
  proportional to p(r(x) | x) (Gumbel top-k), and the label becomes r(x).  Ambiguous images are flipped
  more often, and to the class they resemble — the hardest of the three to detect.

Everything is seeded (``numpy.random.default_rng(seed)``; the reference fit is deterministic on one device).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..files import write_json
from ..settings.data import NOISE_KINDS
from .base import ImageDataset, NoiseRecord

REFERENCE_MAX_FEATURES = 1024  # pixels per image the reference model sees (average-pooled down to this)


def _features(images: torch.Tensor) -> torch.Tensor:
    """uint8 [n, C, H, W] → float [n, d] in [0, 1], average-pooled until d ≤ REFERENCE_MAX_FEATURES."""
    x = images.float() / 255.0
    side = x.shape[-1]
    while x.shape[1] * side * side > REFERENCE_MAX_FEATURES and side > 1:
        side = max(1, side // 2)
    if side != x.shape[-1]:
        x = F.adaptive_avg_pool2d(x, side)
    return x.flatten(1)


def confusable_classes(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """m(y): for each class, the other class whose mean image is nearest (Euclidean) to its own."""
    x = _features(images).double()
    means = torch.stack([x[labels == c].mean(0) if bool((labels == c).any()) else torch.full((x.shape[1],), float("inf"))
                         for c in range(num_classes)])
    dist = torch.cdist(means.nan_to_num(posinf=1e6), means.nan_to_num(posinf=1e6))
    dist.fill_diagonal_(float("inf"))
    return dist.argmin(1).numpy()


def reference_probabilities(images: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float = 1e-3) -> np.ndarray:
    """[n, K] probabilities of a multinomial logistic regression fit to (images, labels) by full-batch L-BFGS."""
    x = _features(images).double()
    x = torch.cat([x - x.mean(0), torch.ones(len(x), 1, dtype=x.dtype)], 1)
    w = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=100, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w, labels) + 0.5 * l2 * w[:-1].pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return torch.softmax(x @ w, 1).numpy()


def flip_labels(labels: torch.Tensor, num_classes: int, rate: float, seed: int, kind: str = "uniform",
                images: torch.Tensor | None = None) -> tuple[torch.Tensor, NoiseRecord]:
    """Flip exactly ``round(rate · n)`` labels, each to a different class, by ``kind`` (see the module docstring).
    ``images`` (uint8 [n, C, H, W]) are needed by ``asymmetric`` and ``instance``."""
    n = int(labels.shape[0])
    if not 0.0 <= rate <= 1.0:
        raise UserError(f"--label-noise must be between 0 and 1, got {rate}")
    if kind not in NOISE_KINDS:
        raise UserError(f"--noise-kind: unknown kind {kind!r}: use {', '.join(NOISE_KINDS)}")
    if rate > 0 and num_classes < 2:
        raise UserError("label noise needs at least 2 classes")
    if kind != "uniform" and images is None:
        raise ValueError(f"{kind} noise needs the images")
    count = int(round(rate * n))
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    if kind == "instance":
        probs = reference_probabilities(images, labels, num_classes)
        probs[np.arange(n), y] = -1.0
        runner_up = probs.argmax(1)
        weight = np.clip(probs[np.arange(n), runner_up], 1e-12, None)
        keys = np.log(weight) + rng.gumbel(size=n)  # Gumbel top-k: sampling without replacement ∝ weight
        indices = np.sort(np.argsort(-keys, kind="stable")[:count])
        flipped = runner_up[indices]
    else:
        indices = np.sort(rng.choice(n, size=count, replace=False))
        if kind == "uniform":
            shift = rng.integers(1, num_classes, size=count) if count else np.zeros(0, dtype=np.int64)
            flipped = (y[indices] + shift) % num_classes
        else:
            flipped = confusable_classes(images, labels, num_classes)[y[indices]]
    original = y[indices].copy()
    noisy = labels.clone()
    noisy[torch.from_numpy(indices)] = torch.from_numpy(flipped.astype(np.int64))
    record = NoiseRecord(rate, seed, indices.tolist(), original.tolist(), flipped.astype(np.int64).tolist(), kind)
    return noisy, record


def write_noise_record(out: Path, dataset: ImageDataset) -> None:
    """``noise.json`` beside a run's results: which training labels were flipped on purpose (the one writer)."""
    if dataset.noise is not None:
        write_json(out / "noise.json", dataset.noise)
