"""``smoothgrad`` / ``vargrad`` (Smilkov et al. 2017; Adebayo et al. 2018): the mean (or variance) of any method's
attribution over ``samples`` noisy copies x + N(0, σ²), σ = ``noise`` × (max x − min x) — or σ = ``sigma`` given
absolutely (Captum's ``stdevs``).  The noise is drawn from a generator seeded with ``seed``, one [B, …] draw per
sample in order, so a run is reproducible.  ``base`` names the wrapped method (default ``gradient``); further
settings go to it."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .base import Attribution
from .targets import Target


def noise_tunnel(model: nn.Module, x: torch.Tensor, target: Target, *, method: Callable[..., Attribution],
                 samples: int = 25, noise: float = 0.15, sigma: float | None = None, kind: str = "smoothgrad", seed: int = 0,
                 **settings: Any) -> Attribution:
    g = torch.Generator().manual_seed(seed)
    sigma = noise * float(x.max() - x.min()) if sigma is None else float(sigma)
    total = torch.zeros_like(x)
    total_sq = torch.zeros_like(x)
    for _ in range(samples):
        noisy = x + sigma * torch.randn(x.shape, generator=g).to(x)
        a = method(model, noisy, target, **settings).attr
        total += a
        total_sq += a * a
    mean = total / samples
    attr = mean if kind == "smoothgrad" else total_sq / samples - mean * mean
    return Attribution(attr, {"samples": samples, "sigma": sigma})
