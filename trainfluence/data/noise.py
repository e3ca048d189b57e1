"""Planted label noise: the ground truth for the mislabel audit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..files import write_json
from .base import ImageDataset, NoiseRecord


def flip_labels(labels: torch.Tensor, num_classes: int, rate: float, seed: int) -> tuple[torch.Tensor, NoiseRecord]:
    """Flip exactly ``round(rate * n)`` labels, each to a uniformly chosen *different* class.

    The flipped positions are a uniform random subset (``numpy.random.default_rng(seed)``); the new label is
    ``(y + U{1, …, K−1}) mod K``, uniform over the K−1 other classes.
    """
    n = int(labels.shape[0])
    if not 0.0 <= rate <= 1.0:
        raise UserError(f"--label-noise must be between 0 and 1, got {rate}")
    if rate > 0 and num_classes < 2:
        raise UserError("label noise needs at least 2 classes")
    count = int(round(rate * n))
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(n, size=count, replace=False))
    original = labels.numpy()[indices].copy()
    shift = rng.integers(1, num_classes, size=count) if count else np.zeros(0, dtype=np.int64)
    flipped = (original + shift) % num_classes
    noisy = labels.clone()
    noisy[torch.from_numpy(indices)] = torch.from_numpy(flipped.astype(np.int64))
    record = NoiseRecord(rate, seed, indices.tolist(), original.tolist(), flipped.tolist())
    return noisy, record


def write_noise_record(out: Path, dataset: ImageDataset) -> None:
    """``noise.json`` beside a run's results: which training labels were flipped on purpose (the one writer)."""
    if dataset.noise is not None:
        write_json(out / "noise.json", dataset.noise)
