"""Which saliency map to trust: localisation against ground-truth boxes, faithfulness by deleting and inserting
pixels, and sensitivity to the model's parameters — always beside a random map.

* deletion / insertion AUC (Petsiuk et al. 2018, RISE): pixels in order of importance are replaced by the
  baseline (0 in normalised space: the dataset's mean colour) — or, for insertion, copied into a blurred image —
  in ``steps`` equal increments; the area under the curve of the target class's probability (trapezoid over the
  fraction of pixels).  Lower deletion and higher insertion are better.
* pointing game and mean box IoU (shapes' ground-truth boxes), see :mod:`.postprocess`.
* cascading model-parameter randomisation (Adebayo et al. 2018): re-initialise the layers from the output
  downwards, one more at a time, and report the Spearman correlation of each new importance map with the
  original — a method that does not depend on the parameters keeps a high correlation.
"""

from __future__ import annotations

import copy
import time
import warnings
from typing import Any, Callable

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from ..predict import Predictor
from ..progress import bar
from . import attribute_full
from .base import evaluating
from .integrated import gaussian_blur
from .postprocess import box_from_map, box_iou, importance, pointing_hit

RANDOM = "random map"
#: every metric, its direction and its label (with ↑ / ↓) — one place for tables and the choice of the best method
METRICS = {"pointing": ("higher", "pointing ↑"), "box_iou": ("higher", "box IoU ↑"),
           "deletion_auc": ("lower", "deletion AUC ↓"), "insertion_auc": ("higher", "insertion AUC ↑")}
BEST_RULE = ("best = the lowest mean rank over the metrics measured (pointing, box IoU, deletion AUC, insertion AUC; "
             "only the faithfulness pair when there are no ground-truth boxes), ties broken by insertion AUC")


def best_method(results: dict[str, dict[str, float]]) -> str:
    """The method (not the random map) with the lowest mean rank over the measured metrics (:data:`BEST_RULE`)."""
    names = [m for m in results if m != RANDOM]
    metrics = [k for k in METRICS if all(k in results[m] for m in names)]
    ranks = {m: 0.0 for m in names}
    for k in metrics:
        sign = -1 if METRICS[k][0] == "higher" else 1
        order = sorted(names, key=lambda m: sign * results[m][k])
        for position, m in enumerate(order):
            ranks[m] += position / len(metrics)
    return min(names, key=lambda m: (ranks[m], -results[m]["insertion_auc"]))


@torch.no_grad()
def deletion_insertion(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, imp: torch.Tensor, classes: torch.Tensor,
                       steps: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Per-image deletion and insertion AUCs for importance maps ``imp`` [B, H, W]; ``model``: the model or its
    :class:`~trainfluence.predict.Predictor`."""
    b, c, h, w = x.shape
    order = torch.argsort(imp.reshape(b, -1), dim=1, descending=True, stable=True)
    blurred = gaussian_blur(x, sigma=3.0)
    fractions = np.linspace(0, 1, steps + 1)
    deletion, insertion = np.zeros((b, steps + 1)), np.zeros((b, steps + 1))
    for s, f in enumerate(fractions):
        k = int(round(f * h * w))
        mask = torch.zeros(b, h * w, dtype=torch.bool)
        mask.scatter_(1, order[:, :k], True)
        mask = mask.view(b, 1, h, w).to(x.device)
        deleted = torch.where(mask, torch.zeros_like(x), x)
        inserted = torch.where(mask, x, blurred)
        for store, batch in ((deletion, deleted), (insertion, inserted)):
            probs = torch.softmax(model(batch), 1)
            store[:, s] = probs.gather(1, classes.view(-1, 1)).squeeze(1).cpu().numpy()
    return np.trapezoid(deletion, fractions, axis=1), np.trapezoid(insertion, fractions, axis=1)


def _maps(model: nn.Module, x: torch.Tensor, method: str, classes: torch.Tensor, settings: dict[str, Any],
          seed: int) -> torch.Tensor:
    if method == RANDOM:
        g = torch.Generator().manual_seed(seed)
        return torch.rand(x.shape[0], *x.shape[2:], generator=g)
    return importance(attribute_full(model, x, method, classes, **settings.get(method, {})).attr)


def evaluate_methods(model: nn.Module, x: torch.Tensor, boxes: torch.Tensor | None, methods: list[str],
                     settings: dict[str, dict[str, Any]] | None = None, *, batch_size: int = 50,
                     steps: int = 32, seed: int = 0) -> dict[str, dict[str, float]]:
    """Localisation and faithfulness of each method (and a random map) on images ``x`` for the predicted class."""
    settings = settings or {}
    predict = Predictor(model)
    with evaluating(model):
        classes = predict(x).argmax(1)
    results: dict[str, dict[str, float]] = {}
    for method in bar([*methods, RANDOM], desc="saliency evaluation", unit="method"):
        hits, ious, dels, ins, seconds = [], [], [], [], 0.0
        for start in range(0, len(x), batch_size):
            xb, cb = x[start : start + batch_size], classes[start : start + batch_size]
            t0 = time.perf_counter()
            imp = _maps(model, xb, method, cb, settings, seed + start)
            seconds += time.perf_counter() - t0
            with evaluating(model):
                d, i = deletion_insertion(predict, xb, imp, cb, steps)
            dels += d.tolist()
            ins += i.tolist()
            if boxes is not None:
                for m, box in zip(imp, boxes[start : start + batch_size]):
                    hits.append(pointing_hit(m, box))
                    ious.append(box_iou(box_from_map(m), box))
        row = {"deletion_auc": float(np.mean(dels)), "insertion_auc": float(np.mean(ins)),
               "seconds_per_image": seconds / len(x)}
        if boxes is not None:
            row.update(pointing=float(np.mean(hits)), box_iou=float(np.mean(ious)))
        results[method] = row
    return results


def randomization_check(model: nn.Module, x: torch.Tensor, methods: list[str],
                        settings: dict[str, dict[str, Any]] | None = None, *, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Spearman(original map, map after re-initialising the top i layers), for i = 1 … number of layers."""
    settings = settings or {}
    with torch.no_grad(), evaluating(model):
        classes = model(x).argmax(1)
    layers = [name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))][::-1]
    out: dict[str, list[dict[str, Any]]] = {}
    for method in [*methods, RANDOM]:
        original = _maps(model, x, method, classes, settings, seed)
        rows = []
        randomized = copy.deepcopy(model)
        torch.manual_seed(seed)
        for depth, name in enumerate(layers, start=1):
            module = dict(randomized.named_modules())[name]
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            maps = _maps(randomized, x, method, classes, settings, seed + depth if method == RANDOM else seed)
            with warnings.catch_warnings():  # a map that became constant has no rank correlation (nan, skipped)
                warnings.simplefilter("ignore")
                rho = [spearmanr(a.reshape(-1).numpy(), b.reshape(-1).numpy())[0] for a, b in zip(original, maps)]
            defined = [r for r in rho if np.isfinite(r)]
            # every map constant (e.g. all zero once the top layers are random): no correlation to report
            rows.append({"randomized_through": name, "layers": depth,
                         "spearman": float(np.mean(defined)) if defined else None, "images": len(defined)})
        out[method] = rows
    return out
