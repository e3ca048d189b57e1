"""``trainfluence saliency``: pixel attributions for chosen images, masks, boxes, and their evaluation."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from ..saliency import METHODS
from ..saliency.run import DEFAULT_METHODS, run_saliency
from ..saliency.targets import parse_target
from .common import add_data_args, add_device_arg, load_checkpoint_and_data, prepare_out

HELP = "saliency maps (gradient, IG, SmoothGrad, Grad-CAM, occlusion, internal influence …) with masks, boxes, evaluation"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("saliency", help=HELP, description=HELP + ".")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a .pt file written by trainfluence train")
    add_data_args(p, from_checkpoint=True)
    p.add_argument("--split", default="test", choices=["train", "test"], help="which split --index refers to (default test)")
    p.add_argument("--index", type=int, nargs="+", default=[0, 1, 2, 3], metavar="I", help="images to explain (default 0 1 2 3)")
    p.add_argument("--method", nargs="+", default=DEFAULT_METHODS, metavar="M", help=f"methods: {', '.join(METHODS)}")
    p.add_argument("--target", default="pred", help="pred (default) | label | C | C1-C2 (contrast) | classes:C,C | "
                   "neuron:LAYER:CH[:ROW:COL]; classes by index or name")
    p.add_argument("--topk-pixels", type=int, default=100, help="pixels in the top-k masks (default 100)")
    p.add_argument("--evaluate", action="store_true", help="pointing game, box IoU, deletion/insertion AUC, randomisation")
    p.add_argument("--eval-size", type=int, default=200, help="images in the evaluation (default 200)")
    p.add_argument("--out", default="runs/saliency", help="output folder (default runs/saliency)")
    add_device_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    unknown = [m for m in args.method if m not in METHODS]
    if unknown:
        raise UserError(f"unknown saliency method {unknown[0]!r}: use one of {', '.join(METHODS)}")
    ckpt, train, test, device = load_checkpoint_and_data(args)
    data = test if args.split == "test" else train
    bad = [i for i in args.index if not 0 <= i < len(data)]
    if bad:
        raise UserError(f"--index {bad[0]} is out of range: the {args.split} split has {len(data)} images")
    target = parse_target(args.target, data.classes)
    out = prepare_out(args.out)
    report = run_saliency(ckpt.model, data, args.index, args.method, target, Path(out), topk=args.topk_pixels,
                          evaluate=args.evaluate, eval_size=args.eval_size)
    if "evaluation" in report:
        print(f"evaluation on {report['evaluation']['images']} images:")
        for m, r in report["evaluation"]["results"].items():
            loc = f"pointing {r['pointing']:.3f}  IoU {r['box_iou']:.3f}  " if "pointing" in r else ""
            print(f"  {m:22s} {loc}deletion {r['deletion_auc']:.3f}  insertion {r['insertion_auc']:.3f}")
    print(f"wrote {out / 'saliency_grid.png'}, {out / 'topk_masks.png'}, {out / 'saliency.json'} and {out / 'index.html'}")
    return 0
