"""``trainfluence internal``: which units of a layer carry a class (Leino et al. 2018 influence-directed
explanations), what they look at, and how much of the class survives when only they are kept."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..settings import POSITIVE_INT
from .common import add_checkpoint_args, add_device_arg, add_out_arg, load_checkpoint_and_data, prepare_out
from .flags import number

HELP = "influence of a layer's units on a class (or class contrast): top units, their saliency, class essence"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("internal", help=HELP, description=HELP + ". Writes internal.json, PNGs and index.html.")
    add_checkpoint_args(p)
    p.add_argument("--layer", required=True, help="the slice: a module name, e.g. features.8 (see the error for a list)")
    p.add_argument("--class", dest="cls", required=True, help="class of interest (index or name)")
    p.add_argument("--versus", default=None, help="comparative QoI: logit of --class minus logit of this class")
    p.add_argument("--doi", default="class", help="distribution of interest: class (test images of --class, default) | "
                   "instance:I | path:I (straight line from the zero baseline to test image I)")
    p.add_argument("--top", type=number(POSITIVE_INT, "--top"), default=8, help="top units shown (default 8)")
    p.add_argument("--aggregate", default="mean", choices=["mean", "max"], help="unit score over positions (default mean)")
    p.add_argument("--essence-images", type=number(POSITIVE_INT, "--essence-images"), default=600,
                   help="test images in the class-essence curves (default 600)")
    p.add_argument("--images", type=number(POSITIVE_INT, "--images"), default=4,
                   help="images of the class shown with each top unit's saliency (default 4)")
    add_out_arg(p, "runs/internal")
    add_device_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..internal_report import InternalRequest, run_internal

    ckpt, _train, test, device = load_checkpoint_and_data(args)
    request = InternalRequest(args.layer, args.cls, args.versus, args.doi, args.top, args.aggregate, args.essence_images,
                              args.images)
    out = prepare_out(args.out)
    report = run_internal(ckpt.model, test, request, Path(out), device)
    print(f"top units of {args.layer} for {report['class']}" + (f" vs {report['versus']}" if report["versus"] else "") +
          ": " + ", ".join(f"{t['unit']} ({t['influence_mean']:.3g})" for t in report["top_units"]))
    e = report["class_essence"][report["class"]]
    print(f"class essence of {report['class']} vs the rest (k: AUC top-k / random k, binary accuracy top-k / random k): " +
          ", ".join(f"{k}: {au:.3f}/{ru:.3f}, {a:.3f}/{r:.3f}" for k, au, ru, a, r in
                    zip(e["k"], e["top_auc"], e["random_auc"], e["top_accuracy"], e["random_accuracy"])))
    print(f"wrote {out / 'internal.json'}, top_units.png, class_essence.png and index.html")
    return 0
