"""The ``trainfluence saliency`` pipeline: maps for chosen images, top-k masks and boxes, pictures, evaluation."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import ImageDataset
from ..progress import warn
from ..report import html
from ..report.figures import Panel, panel_grid, to_display
from ..files import write_json
from . import attribute_full
from .base import evaluating
from .evaluate import BEST_RULE, METRICS, best_method, evaluate_methods, randomization_check
from .postprocess import box_from_map, box_iou, importance, pointing_hit, topk_mask
from .targets import ClassTarget, Target

DEFAULT_METHODS = ["gradient", "grad_x_input", "guided_backprop", "integrated_gradients", "smoothgrad", "grad_cam",
                   "occlusion", "internal_influence"]
DEFAULT_SETTINGS: dict[str, dict[str, Any]] = {
    "integrated_gradients": {"steps": 50},
    "smoothgrad": {"samples": 25},
    "vargrad": {"samples": 25},
    "occlusion": {"window": 6, "stride": 2},
}


def resolve_target(target: Target | str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Target:
    if target == "label":
        return ClassTarget(y)
    if target == "pred":
        with torch.no_grad(), evaluating(model):
            return ClassTarget(model(x).argmax(1))
    assert isinstance(target, Target)
    return target


def run_saliency(model: nn.Module, data: ImageDataset, indices: list[int], methods: list[str], target: Target | str,
                 out: Path, *, topk: int = 100, evaluate: bool = False, eval_size: int = 200,
                 randomization_images: int = 16, settings: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    settings = {**DEFAULT_SETTINGS, **(settings or {})}
    out.mkdir(parents=True, exist_ok=True)
    x, y = data.tensors(indices)
    tgt = resolve_target(target, model, x, y)
    with torch.no_grad(), evaluating(model):
        pred = model(x).argmax(1)
    report: dict[str, Any] = {"target": repr(target) if not isinstance(target, str) else target, "topk_pixels": topk,
                              "methods": methods, "images": [], "settings": settings}
    maps: dict[str, torch.Tensor] = {}
    timings: dict[str, float] = {}
    for m in methods:
        t0 = time.perf_counter()
        result = attribute_full(model, x, m, tgt, **settings.get(m, {}))
        timings[m] = (time.perf_counter() - t0) / len(indices)
        maps[m] = importance(result.attr)
        if m == "integrated_gradients":
            info = result.info
            report["integrated_gradients"] = {"delta": info["delta"].tolist(), "relative_gap": info["relative_gap"].tolist(),
                                              "steps": info["steps"].tolist(), "converged": info["converged"].tolist()}
            if not bool(info["converged"].all()):
                warn(f"integrated gradients: {int((~info['converged']).sum())} image(s) still above the completeness "
                     f"tolerance after {int(info['steps'].max())} steps (worst gap "
                     f"{100 * float(info['relative_gap'].max()):.2f}%)")
    masks = {m: topk_mask(maps[m], topk) for m in methods}
    for row, i in enumerate(indices):
        entry: dict[str, Any] = {"index": int(i), "label": data.classes[int(y[row])], "prediction": data.classes[int(pred[row])],
                                 "methods": {}}
        gt = data.boxes[i].tolist() if data.boxes is not None else None
        if gt is not None:
            entry["box"] = gt
        for m in methods:
            box = box_from_map(maps[m][row])
            item: dict[str, Any] = {"box": list(box), "topk_pixels_in_box": None}
            if gt is not None:
                x0, y0, x1, y1 = gt
                item.update(iou=box_iou(box, gt), pointing_hit=pointing_hit(maps[m][row], gt),
                            topk_pixels_in_box=int(masks[m][row, y0 : y1 + 1, x0 : x1 + 1].sum()))
            entry["methods"][m] = item
        report["images"].append(entry)
    report["seconds_per_image"] = timings
    _pictures(data, indices, x, maps, masks, report, out)
    if evaluate:
        n = min(eval_size, len(data))
        xe, _ = data.tensors(np.arange(n))
        boxes = data.boxes[:n] if data.boxes is not None else None
        results = evaluate_methods(model, xe, boxes, methods, settings)
        report["evaluation"] = {"images": n, "results": results, "best": best_method(results), "best_rule": BEST_RULE}
        report["randomization"] = randomization_check(model, xe[: min(randomization_images, n)], methods, settings)
    write_json(out / "saliency.json", report)
    _html(report, out)
    return report


def _pictures(data: ImageDataset, indices: list[int], x: torch.Tensor, maps: dict[str, torch.Tensor],
              masks: dict[str, torch.Tensor], report: dict[str, Any], out: Path) -> None:
    rows, mask_rows = [], []
    for row, i in enumerate(indices):
        img = to_display(data.images[i])
        entry = report["images"][row]
        gt = entry.get("box")
        head = Panel(img, f"#{i} {entry['label']}\npred {entry['prediction']}", box=gt)
        rows.append([head] + [Panel(img, m, overlay=maps[m][row].numpy(), box=gt, box2=entry["methods"][m]["box"])
                              for m in maps])
        dim = img * 0.25
        mask_rows.append([head] + [Panel(np.where(masks[m][row].numpy()[..., None] if img.ndim == 3 else masks[m][row].numpy(),
                                                  img, dim), f"{m}\ntop {report['topk_pixels']}", box=gt) for m in maps])
    legend = "importance (red) · yellow: box from the map" + (" · green: ground-truth box" if data.boxes is not None else "")
    panel_grid(rows, out / "saliency_grid.png", title=legend)
    panel_grid(mask_rows, out / "topk_masks.png", title=f"the {report['topk_pixels']} most important pixels of each map")


def _html(report: dict[str, Any], out: Path) -> None:
    parts = ["<h1>Which pixels drive the prediction?</h1>",
             f"<p class='muted'>Target: {html.esc(report['target'])}. Importance = Σ over channels of |attribution|; "
             f"boxes: largest connected region above 30% of the maximum.</p>",
             html.img("saliency_grid.png", "saliency maps side by side", "figure"),
             html.img("topk_masks.png", "top-k pixel masks", "figure")]
    if "evaluation" in report:
        ev = report["evaluation"]
        res = ev["results"]
        cols = [k for k in METRICS if any(k in r for r in res.values())]
        parts.append(f"<h2>Evaluation on {ev['images']} images</h2>"
                     "<p class='muted'>↑ higher is better, ↓ lower is better. Pointing and box IoU against ground-truth "
                     "boxes; deletion and insertion AUC of the class probability as the most important pixels are "
                     f"removed or restored. Best: <b>{html.esc(ev['best'])}</b> ({html.esc(ev['best_rule'])}).</p>")
        parts.append(html.table(["method", *[METRICS[c][1] for c in cols], "ms per image"],
                                [[m, *[r.get(c, "") for c in cols], 1e3 * r["seconds_per_image"]] for m, r in res.items()]))
        parts.append("<h2>Cascading parameter randomisation</h2><p class='muted'>Spearman correlation with the "
                     "original map after re-initialising the layers from the top; lower means the map depends on the "
                     "learned parameters.</p>")
        rnd = report["randomization"]
        layers = [r["randomized_through"] for r in next(iter(rnd.values()))]
        parts.append(html.table(["method", *layers], [[m, *[r["spearman"] for r in rows]] for m, rows in rnd.items()]))
    html.write_page(out / "index.html", "trainfluence saliency", "\n".join(parts))
