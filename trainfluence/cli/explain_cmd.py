"""``trainfluence explain``: the training images that most helped and most hurt chosen test predictions."""

from __future__ import annotations

import argparse

from ..errors import UserError
from ..explain import explain
from .common import add_data_args, add_device_arg, load_checkpoint_and_data, prepare_out
from .influence_args import add_influence_args, engine_from_args

HELP = "rank the training images by their influence on test predictions (most helpful and most harmful)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help=HELP, description=HELP + ". Writes influence.json, PNG grids and index.html.")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a .pt file written by trainfluence train")
    add_data_args(p, from_checkpoint=True)
    p.add_argument("--test-index", type=int, nargs="+", required=True, metavar="I", help="test image(s) to explain")
    p.add_argument("--k", type=int, default=10, help="how many helpful and harmful training images (default 10)")
    p.add_argument("--pixels", action="store_true", help="also draw each shown training image's I_pert,loss pixel map")
    p.add_argument("--out", default="runs/explain", help="output folder (default runs/explain)")
    add_influence_args(p, solver="exact", damping=0.01, params="last", hessian_samples=None)
    add_device_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise UserError(f"--k must be at least 1, got {args.k}")
    ckpt, train, test, device = load_checkpoint_and_data(args)
    bad = [i for i in args.test_index if not 0 <= i < len(test)]
    if bad:
        raise UserError(f"--test-index {bad[0]} is out of range: the test split has {len(test)} images (0..{len(test) - 1})")
    out = prepare_out(args.out)
    engine = engine_from_args(args, ckpt, train, device)
    report = explain(engine, train, test, args.test_index, min(args.k, len(train)), out, pixels=args.pixels)
    for item in report["explanations"]:
        t = item["test"]
        print(f"test #{t['index']} ({t['label_name']}, predicted {t['prediction_name']} {t['probability']:.2f}):")
        print("  most helpful: " + ", ".join(f"#{e['index']} {e['label_name']} ({e['score']:.3g})" for e in item["helpful"][:5]))
        print("  most harmful: " + ", ".join(f"#{e['index']} {e['label_name']} ({e['score']:.3g})" for e in item["harmful"][:5]))
    print(f"wrote {out / 'influence.json'}, {len(report['explanations'])} PNG grid(s) and {out / 'index.html'}")
    return 0
