"""``trainfluence internal``: which internal units carry a class (Leino et al. 2018 influence-directed
explanations), what they look at, and how much of the class survives when only they are kept."""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..errors import UserError  # noqa: E402
from ..internal import class_essence, distributional_influence, path_doi, top_units, unit_saliency, unit_scores  # noqa: E402
from ..report import html  # noqa: E402
from ..report.figures import Panel, panel_grid, to_display  # noqa: E402
from ..saliency.base import evaluating  # noqa: E402
from ..saliency.targets import ClassTarget, ContrastTarget, capture, named_module, parse_target  # noqa: E402
from ..settings import write_json  # noqa: E402
from .common import add_data_args, add_device_arg, load_checkpoint_and_data, prepare_out  # noqa: E402

HELP = "influence of a layer's units on a class (or class contrast): top units, their saliency, class essence"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("internal", help=HELP, description=HELP + ". Writes internal.json, PNGs and index.html.")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a .pt file written by trainfluence train")
    add_data_args(p, from_checkpoint=True)
    p.add_argument("--layer", required=True, help="the slice: a module name, e.g. features.8 (see the error for a list)")
    p.add_argument("--class", dest="cls", required=True, help="class of interest (index or name)")
    p.add_argument("--versus", default=None, help="comparative QoI: logit of --class minus logit of this class")
    p.add_argument("--doi", default="class", help="distribution of interest: class (test images of --class, default) | "
                   "instance:I | path:I (straight line from the zero baseline to test image I)")
    p.add_argument("--top", type=int, default=8, help="top units shown (default 8)")
    p.add_argument("--aggregate", default="mean", choices=["mean", "max"], help="unit score over positions (default mean)")
    p.add_argument("--essence-images", type=int, default=600, help="test images in the class-essence curves (default 600)")
    p.add_argument("--images", type=int, default=4, help="images of the class shown with each top unit's saliency")
    p.add_argument("--out", default="runs/internal", help="output folder (default runs/internal)")
    add_device_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    ckpt, _train, test, device = load_checkpoint_and_data(args)
    model = ckpt.model
    named_module(model, args.layer)
    cls = parse_target(args.cls, test.classes)
    if not isinstance(cls, ClassTarget):
        raise UserError("--class takes one class (index or name)")
    c = int(cls.classes)
    qoi = ContrastTarget(c, int(parse_target(args.versus, test.classes).classes)) if args.versus else cls  # type: ignore[union-attr]
    x, y = test.tensors(device=device)
    if args.doi == "class":
        doi = x[y == c]
    elif args.doi.startswith(("instance:", "path:")):
        i = int(args.doi.split(":")[1])
        doi = x[i : i + 1] if args.doi.startswith("instance:") else path_doi(x[i], torch.zeros_like(x[i]))
    else:
        raise UserError(f"unknown --doi {args.doi!r}: use class, instance:I or path:I")
    if len(doi) == 0:
        raise UserError(f"no test images of class {test.classes[c]!r} for the distribution of interest")
    out = prepare_out(args.out)
    chi = distributional_influence(model, args.layer, doi, qoi)
    scores = {how: unit_scores(chi, how) for how in ("mean", "max")}
    ranking = top_units(scores[args.aggregate], len(scores[args.aggregate]))
    top = ranking[: args.top]

    # each top unit as the input saliency of its activation on a few images of the class
    shown = torch.nonzero(y == c).flatten()[: args.images].tolist()
    rows = []
    for i in shown:
        row = [Panel(to_display(test.images[i]), f"#{i} {test.classes[int(y[i])]}")]
        for u in top.tolist():
            sal = unit_saliency(model, args.layer, x[i : i + 1], torch.tensor([u])).abs().sum(1)[0].cpu().numpy()
            row.append(Panel(to_display(test.images[i]), f"unit {u}", overlay=sal))
        rows.append(row)
    panel_grid(rows, Path(out) / "top_units.png", title=f"input saliency of the top {len(top)} units of {args.layer}")

    with evaluating(model), capture(model, args.layer) as store:
        model(x[:1])
    channels = store["out"].shape[1]
    ks = sorted({k for k in (1, 2, 4, 8, 16, channels // 2, channels) if 1 <= k <= channels})
    xe, ye = x[: args.essence_images], y[: args.essence_images]
    essence = {}
    for k_cls in range(test.num_classes):
        k_chi = distributional_influence(model, args.layer, x[y == k_cls], ClassTarget(k_cls)) if k_cls != c or args.versus else chi
        k_rank = top_units(unit_scores(k_chi, args.aggregate), channels)
        essence[test.classes[k_cls]] = class_essence(model, args.layer, xe, ye, k_cls, k_rank, ks, random_draws=3)
    with torch.no_grad(), evaluating(model):
        logits = model(xe)
    _essence_plot(essence, test.classes[c], Path(out) / "class_essence.png")
    report = {"layer": args.layer, "class": test.classes[c], "versus": args.versus, "doi": args.doi,
              "doi_size": len(doi), "aggregate": args.aggregate, "channels": channels,
              "top_units": [{"unit": int(u), "influence_mean": float(scores["mean"][u]), "influence_max": float(scores["max"][u])}
                            for u in top],
              "unmasked_accuracy": float((logits.argmax(1) == ye).float().mean()), "class_essence": essence,
              "essence_images": len(ye)}
    write_json(Path(out) / "internal.json", report)
    _html(report, Path(out))
    print(f"top units of {args.layer} for {report['class']}" + (f" vs {args.versus}" if args.versus else "") + ": " +
          ", ".join(f"{t['unit']} ({t['influence_mean']:.3g})" for t in report["top_units"]))
    e = essence[report["class"]]
    print(f"class essence of {report['class']} vs the rest (k: AUC top-k / random k, binary accuracy top-k / random k): " +
          ", ".join(f"{k}: {au:.3f}/{ru:.3f}, {a:.3f}/{r:.3f}" for k, au, ru, a, r in
                    zip(e["k"], e["top_auc"], e["random_auc"], e["top_accuracy"], e["random_accuracy"])))
    print(f"wrote {out / 'internal.json'}, top_units.png, class_essence.png and index.html")
    return 0


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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _html(report: dict, out: Path) -> None:
    esc = html.esc
    parts = [f"<h1>Units of {esc(report['layer'])} that carry {esc(report['class'])}"
             + (f" rather than {esc(report['versus'])}" if report["versus"] else "") + "</h1>",
             f"<p class='muted'>Influence of a unit = mean gradient of the quantity of interest (a logit"
             f"{' difference' if report['versus'] else ''}) with respect to the unit, over the distribution of interest "
             f"({esc(report['doi'])}, {report['doi_size']} images); units ranked by the {esc(report['aggregate'])} over positions.</p>",
             html.table(["unit", "influence (mean)", "influence (max)"],
                        [[t["unit"], t["influence_mean"], t["influence_max"]] for t in report["top_units"]]),
             html.img("top_units.png", "input saliency of the top units", "figure"),
             "<h2>Class essence</h2><p class='muted'>Only the top-k units kept (the rest zeroed): how well does "
             "the model still tell the class from the others, from the class's logit alone? AUC over all thresholds; "
             "binary accuracy of one threshold fitted on half the images and measured on the other half; the model's "
             "own argmax decision (which keeping only a class's units tends to turn into that class everywhere).</p>",
             html.img("class_essence.png", "class essence curves", "figure")]
    e = report["class_essence"][report["class"]]
    parts.append(html.table(["k", "AUC (top-k)", "AUC (random k)", "accuracy (top-k)", "accuracy (random k)",
                             "argmax accuracy (top-k)"],
                            list(zip(e["k"], e["top_auc"], e["random_auc"], e["top_accuracy"], e["random_accuracy"],
                                     e["top_argmax_accuracy"]))))
    html.write_page(out / "index.html", "trainfluence internal", "\n".join(parts))


__all__ = ["add_parser", "run"]
