"""Distributional influence of internal units (Leino et al. 2018, "Influence-directed explanations").

A *slice* is a named layer with activations z; a *quantity of interest* (QoI) q is a function of the model's
outputs — a class logit, a comparative logit difference, or any :class:`~trainfluence.saliency.targets.Target`;
a *distribution of interest* (DoI) P is a set of inputs — one instance, the images of a class, or the points of a
straight path from a baseline to x.  The influence of unit j is

    χⱼ = E_{x∼P} [ ∂q/∂zⱼ (x) ],

an array shaped like the layer's activation of one example ([C, H, W] for a convolution).  Units are ranked by
channel: the mean or the max of χ over positions.  For a path DoI, χ ⊙ (z(x) − z(x′)) is integrated gradients
at the slice.  A unit is shown by the input saliency of its activation (gradient of its mean over positions).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from torch import nn

from .errors import UserError
from .predict import Predictor
from .saliency.base import evaluating
from .saliency.integrated import quadrature
from .saliency.targets import Target, capture, named_module


def layer_gradients(model: nn.Module, layer: str, x: torch.Tensor, qoi: Target) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations z of ``layer`` and ∂q/∂z for a batch (one QoI value per example)."""
    with torch.enable_grad(), capture(model, layer) as store:
        values = qoi(model, x.detach())
        acts = store["out"]
        (grads,) = torch.autograd.grad(values.sum(), acts)
    return acts.detach(), grads.detach()


def distributional_influence(model: nn.Module, layer: str, doi: torch.Tensor, qoi: Target, *,
                             batch_size: int = 256) -> torch.Tensor:
    """χ = mean over the DoI of ∂q/∂z, shaped like one example's activation of ``layer``."""
    if len(doi) == 0:
        raise UserError("the distribution of interest is empty")
    total = None
    with evaluating(model):
        for start in range(0, len(doi), batch_size):
            idx = torch.arange(start, min(len(doi), start + batch_size))
            _, grads = layer_gradients(model, layer, doi[idx], qoi.select(idx))
            s = grads.sum(0)
            total = s if total is None else total + s
    assert total is not None
    return total / len(doi)


def path_doi(x: torch.Tensor, baseline: torch.Tensor, steps: int = 32) -> torch.Tensor:
    """Midpoint-rule points of the straight line from ``baseline`` to ``x`` (one example [C, H, W])."""
    alphas, _ = quadrature(steps, "midpoint")
    a = torch.as_tensor(alphas, dtype=x.dtype).view(-1, *[1] * x.dim())
    return baseline.unsqueeze(0) + a * (x - baseline).unsqueeze(0)


def unit_scores(influence: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """One influence per channel: the mean or the max over positions (a fully connected layer: itself)."""
    if influence.dim() == 1:
        return influence
    flat = influence.reshape(influence.shape[0], -1)
    if how == "mean":
        return flat.mean(1)
    if how == "max":
        return flat.max(1).values
    raise UserError(f"unknown unit aggregation {how!r}: use mean or max")


def top_units(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k most positively influential units (stable for ties)."""
    order = np.argsort(-scores.detach().cpu().numpy(), kind="stable")
    return torch.as_tensor(order[: min(k, len(order))].copy())


def unit_saliency(model: nn.Module, layer: str, x: torch.Tensor, units: torch.Tensor,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """∂/∂x of Σ_u w_u · mean_positions(z_u(x)): the input saliency of units (weights default 1)."""
    w = torch.ones(len(units)) if weights is None else weights

    class UnitsTarget(Target):
        def __call__(self, m: nn.Module, inp: torch.Tensor) -> torch.Tensor:
            with capture(m, layer) as store:
                m(inp)
            act = store["out"][:, units.to(inp.device)]
            return (act.reshape(len(inp), len(units), -1).mean(2) * w.to(act)).sum(1)

    from .saliency.base import input_gradient

    with evaluating(model):
        grad, _ = input_gradient(model, x, UnitsTarget())
    return grad


# ---- class essence: keep only the most influential units -----------------------------------------------------
@contextlib.contextmanager
def keep_units(model: nn.Module, layer: str, keep: torch.Tensor) -> Iterator[None]:
    """Within the block, every channel of ``layer`` except ``keep`` (a boolean mask over channels) is zeroed."""
    def hook(_m, _inp, out):
        return out * keep.to(out).view((1, -1) + (1,) * (out.dim() - 2))

    handle = named_module(model, layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def threshold_accuracy(score: np.ndarray, truth: np.ndarray) -> float:
    """Accuracy of the rule ``score > t`` for ``truth``, with t fitted on one half of the examples (even / odd
    positions) and measured on the other, averaged over the two ways round (no threshold sees its own test)."""
    def best_threshold(s: np.ndarray, t: np.ndarray) -> float:
        u = np.unique(s)
        cands = np.concatenate([[-np.inf], (u[:-1] + u[1:]) / 2, [np.inf]])
        return float(cands[np.argmax(((s[None, :] > cands[:, None]) == t[None, :]).mean(1))])

    even = np.arange(len(score)) % 2 == 0
    return float(np.mean([((score[~h] > best_threshold(score[h], truth[h])) == truth[~h]).mean() for h in (even, ~even)]))


def binary_separation(logits: torch.Tensor, labels: torch.Tensor, cls: int) -> dict[str, float]:
    """Class ``cls`` against the rest, from the class's logit alone (how much evidence for the class the kept
    units still carry): binary accuracy of a threshold on it (:func:`threshold_accuracy`) and its ROC AUC; beside
    them the accuracy of the model's own decision (argmax = cls or not), which masking units can make degenerate
    (keeping only the units that favour a class makes that class win everywhere)."""
    from .audit.metrics import roc_auc

    truth = (labels == cls).cpu().numpy()
    score = logits[:, cls].double().cpu().numpy()
    decided = (logits.argmax(1) == cls).cpu().numpy()
    return {"accuracy": threshold_accuracy(score, truth), "auc": roc_auc(score, truth),
            "argmax_accuracy": float((decided == truth).mean())}


@torch.no_grad()
def class_essence(model: nn.Module, layer: str, x: torch.Tensor, y: torch.Tensor, cls: int, ranking: torch.Tensor,
                  ks: list[int], *, random_draws: int = 5, seed: int = 0) -> dict[str, list]:
    """Binary accuracy/AUC of class ``cls`` vs the rest (:func:`binary_separation`) when only the top-k units of
    ``ranking`` are kept, for each k, beside the mean over ``random_draws`` sets of k random units."""
    channels = len(ranking)
    gen = torch.Generator().manual_seed(seed)
    predict = Predictor(model)

    def evaluate(keep: torch.Tensor) -> dict[str, float]:
        with evaluating(model), keep_units(model, layer, keep):  # the predictor runs the model's hooks too
            logits = predict(x)
        return binary_separation(logits, y, cls)

    rows: dict[str, list] = {"k": [], "top_accuracy": [], "top_auc": [], "top_argmax_accuracy": [], "random_accuracy": [],
                             "random_auc": []}
    for k in ks:
        keep = torch.zeros(channels, dtype=torch.bool)
        keep[ranking[:k]] = True
        top = evaluate(keep)
        rand = [evaluate(torch.zeros(channels, dtype=torch.bool).index_fill_(0, torch.randperm(channels, generator=gen)[:k], True))
                for _ in range(random_draws)]
        rows["k"].append(k)
        rows["top_accuracy"].append(top["accuracy"])
        rows["top_auc"].append(top["auc"])
        rows["top_argmax_accuracy"].append(top["argmax_accuracy"])
        rows["random_accuracy"].append(float(np.mean([r["accuracy"] for r in rand])))
        rows["random_auc"].append(float(np.nanmean([r["auc"] for r in rand])))
    return rows
