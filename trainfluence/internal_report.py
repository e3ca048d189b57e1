"""The ``trainfluence internal`` pipeline: which units of a layer carry a class (or a class contrast), what they
look at, and how much of the class survives when only they are kept — written as JSON, PNGs and HTML.

The definitions are in :mod:`trainfluence.internal`; this module chooses the distribution and quantity of
interest from a request, runs them over a dataset and writes the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data import ImageDataset
from .errors import UserError
from .files import write_json
from .internal import class_essence, distributional_influence, path_doi, top_units, unit_saliency, unit_scores
from .report import html
from .report.figures import Panel, panel_grid, plt, save_figure, to_display
from .saliency.base import evaluating
from .saliency.targets import ClassTarget, ContrastTarget, capture, class_index, named_module


@dataclass
class InternalRequest:
    layer: str
    cls: str  # class of interest, index or name
    versus: str | None = None  # comparative QoI: logit of cls minus logit of this class
    doi: str = "class"  # class | instance:I | path:I
    top: int = 8
    aggregate: str = "mean"  # mean | max over positions
    essence_images: int = 600
    images: int = 4


def distribution_of_interest(spec: str, x: torch.Tensor, y: torch.Tensor, c: int) -> torch.Tensor:
    """``class`` (the images of class c), ``instance:I`` (image I) or ``path:I`` (the straight line from the zero
    baseline to image I)."""
    if spec == "class":
        return x[y == c]
    kind, _, arg = spec.partition(":")
    if kind not in ("instance", "path"):
        raise UserError(f"unknown --doi {spec!r}: use class, instance:I or path:I")
    try:
        i = int(arg)
    except ValueError:
        raise UserError(f"--doi {spec}: I must be an image index") from None
    if not 0 <= i < len(x):
        raise UserError(f"--doi {spec}: image {i} is out of range (the split has {len(x)} images, 0..{len(x) - 1})")
    return x[i : i + 1] if kind == "instance" else path_doi(x[i], torch.zeros_like(x[i]))


def run_internal(model: torch.nn.Module, data: ImageDataset, request: InternalRequest, out: Path,
                 device: torch.device | str = "cpu") -> dict[str, Any]:
    named_module(model, request.layer)
    c = class_index(request.cls, data.classes, "--class")
    qoi = ContrastTarget(c, class_index(request.versus, data.classes, "--versus")) if request.versus else ClassTarget(c)
    x, y = data.tensors(device=device)
    doi = distribution_of_interest(request.doi, x, y, c)
    if len(doi) == 0:
        raise UserError(f"no images of class {data.classes[c]!r} for the distribution of interest")
    chi = distributional_influence(model, request.layer, doi, qoi)
    scores = {how: unit_scores(chi, how) for how in ("mean", "max")}
    ranking = top_units(scores[request.aggregate], len(scores[request.aggregate]))
    top = ranking[: request.top]

    # each top unit as the input saliency of its activation on a few images of the class
    shown = torch.nonzero(y == c).flatten()[: request.images].tolist()
    rows = []
    for i in shown:
        row = [Panel(to_display(data.images[i]), f"#{i} {data.classes[int(y[i])]}")]
        for u in top.tolist():
            sal = unit_saliency(model, request.layer, x[i : i + 1], torch.tensor([u])).abs().sum(1)[0].cpu().numpy()
            row.append(Panel(to_display(data.images[i]), f"unit {u}", overlay=sal))
        rows.append(row)
    if rows:
        panel_grid(rows, out / "top_units.png", title=f"input saliency of the top {len(top)} units of {request.layer}")

    with evaluating(model), capture(model, request.layer) as store:
        model(x[:1])
    channels = store["out"].shape[1]
    ks = sorted({k for k in (1, 2, 4, 8, 16, channels // 2, channels) if 1 <= k <= channels})
    xe, ye = x[: request.essence_images], y[: request.essence_images]
    essence = {}
    for k_cls in range(data.num_classes):
        members = x[y == k_cls]
        if len(members) == 0:
            continue
        k_chi = distributional_influence(model, request.layer, members, ClassTarget(k_cls)) \
            if k_cls != c or request.versus else chi
        k_rank = top_units(unit_scores(k_chi, request.aggregate), channels)
        essence[data.classes[k_cls]] = class_essence(model, request.layer, xe, ye, k_cls, k_rank, ks, random_draws=3)
    with torch.no_grad(), evaluating(model):
        logits = model(xe)
    _essence_plot(essence, data.classes[c], out / "class_essence.png")
    report = {"layer": request.layer, "class": data.classes[c], "versus": data.classes[qoi.c2] if request.versus else None,
              "doi": request.doi, "doi_size": len(doi), "aggregate": request.aggregate, "channels": channels,
              "top_units": [{"unit": int(u), "influence_mean": float(scores["mean"][u]),
                             "influence_max": float(scores["max"][u])} for u in top],
              "unmasked_accuracy": float((logits.argmax(1) == ye).float().mean()), "class_essence": essence,
              "essence_images": len(ye), "pictures": bool(rows)}
    write_json(out / "internal.json", report)
    _html(report, out)
    return report


def _essence_plot(essence: dict, chosen: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, e in essence.items():
        lw = 2.5 if name == chosen else 1.0
        line, = ax.plot(e["k"], e["top_auc"], "o-", lw=lw, label=f"{name}: top-k")
        ax.plot(e["k"], e["random_auc"], ":", color=line.get_color(), lw=lw)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("units kept (k)")
    ax.set_ylabel("AUC of the class logit: class vs rest")
    ax.set_title("class essence (dotted: k random units)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def _html(report: dict, out: Path) -> None:
    esc = html.esc
    parts = [f"<h1>Units of {esc(report['layer'])} that carry {esc(report['class'])}"
             + (f" rather than {esc(report['versus'])}" if report["versus"] else "") + "</h1>",
             f"<p class='muted'>Influence of a unit = mean gradient of the quantity of interest (a logit"
             f"{' difference' if report['versus'] else ''}) with respect to the unit, over the distribution of interest "
             f"({esc(report['doi'])}, {report['doi_size']} images); units ranked by the {esc(report['aggregate'])} over positions.</p>",
             html.table(["unit", "influence (mean)", "influence (max)"],
                        [[t["unit"], t["influence_mean"], t["influence_max"]] for t in report["top_units"]]),
             html.img("top_units.png", "input saliency of the top units", "figure") if report["pictures"] else "",
             "<h2>Class essence</h2><p class='muted'>Only the top-k units kept (the rest zeroed): how well does "
             "the model still tell the class from the others, from the class's logit alone? AUC over all thresholds; "
             "binary accuracy of one threshold fitted on half the images and measured on the other half; the model's "
             "own argmax decision (which keeping only a class's units tends to turn into that class everywhere).</p>",
             html.img("class_essence.png", "class essence curves", "figure")]
    e = report["class_essence"].get(report["class"])
    if e:
        parts.append(html.table(["k", "AUC (top-k)", "AUC (random k)", "accuracy (top-k)", "accuracy (random k)",
                                 "argmax accuracy (top-k)"],
                                list(zip(e["k"], e["top_auc"], e["random_auc"], e["top_accuracy"], e["random_accuracy"],
                                         e["top_argmax_accuracy"]))))
    html.write_page(out / "index.html", "trainfluence internal", "\n".join(parts))
