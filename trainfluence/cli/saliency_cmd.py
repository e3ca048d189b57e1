"""``trainfluence saliency``: pixel attributions for chosen images, masks, boxes, and their evaluation."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..settings import POSITIVE_INT, Range
from ..settings.saliency import DEFAULT_METHODS, METHOD_NAMES
from .common import add_checkpoint_args, add_device_arg, add_out_arg, check_indices, load_checkpoint_and_data, prepare_out
from .flags import alias, number

HELP = "saliency maps (gradient, IG, SmoothGrad, Grad-CAM, occlusion, internal influence …) with masks, boxes, evaluation"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("saliency", help=HELP, description=HELP + ".")
    add_checkpoint_args(p)
    p.add_argument("--split", default="test", choices=["train", "test"], help="which split --index refers to (default test)")
    p.add_argument("--index", type=number(Range(low=0, integer=True), "--index"), nargs="+", default=[0, 1, 2, 3],
                   metavar="I", help="images to explain (default 0 1 2 3)")
    p.add_argument("--method", nargs="+", default=list(DEFAULT_METHODS), choices=METHOD_NAMES, metavar="M",
                   help=f"methods: {', '.join(METHOD_NAMES)} (default: all but vargrad)")
    p.add_argument("--target", default="pred", help="pred (default) | label | C | C1-C2 (contrast) | classes:C,C | "
                   "neuron:LAYER:CH[:ROW:COL]; classes by index or name")
    p.add_argument("--top-pixels", dest="top_pixels", type=number(POSITIVE_INT, "--top-pixels"),
                   default=100, help="pixels in the top-k masks (default 100)")
    alias(p, "--topk-pixels", "--top-pixels", dest="top_pixels", type=number(POSITIVE_INT, "--top-pixels"))
    p.add_argument("--evaluate", action="store_true", help="pointing game, box IoU, deletion/insertion AUC, randomisation")
    p.add_argument("--eval-size", type=number(POSITIVE_INT, "--eval-size"), default=200,
                   help="images in the evaluation (default 200)")
    add_out_arg(p, "runs/saliency")
    add_device_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..saliency.run import run_saliency
    from ..saliency.targets import parse_target

    ckpt, train, test, device = load_checkpoint_and_data(args)
    data = test if args.split == "test" else train
    check_indices(args.index, len(data), "--index", f"the {args.split} split")
    target = parse_target(args.target, data.classes)
    out = prepare_out(args.out)
    report = run_saliency(ckpt.model, data, args.index, args.method, target, Path(out), topk=args.top_pixels,
                          evaluate=args.evaluate, eval_size=args.eval_size)
    if "evaluation" in report:
        print(f"evaluation on {report['evaluation']['images']} images:")
        for m, r in report["evaluation"]["results"].items():
            loc = f"pointing {r['pointing']:.3f}  IoU {r['box_iou']:.3f}  " if "pointing" in r else ""
            print(f"  {m:22s} {loc}deletion {r['deletion_auc']:.3f}  insertion {r['insertion_auc']:.3f}")
    print(f"wrote {out / 'saliency_grid.png'}, {out / 'topk_masks.png'}, {out / 'saliency.json'} and {out / 'index.html'}")
    return 0
