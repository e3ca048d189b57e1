"""``trainfluence audit``: which training labels are wrong?"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..audit import AuditSettings, run_audit
from ..audit.scores import SCORES
from .common import add_data_args, add_device_arg, load_checkpoint_and_data, prepare_out
from .influence_args import add_influence_args, engine_from_args

HELP = "rank training examples as likely label errors, suggest labels, measure against planted noise"


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = AuditSettings()
    p = sub.add_parser("audit", help=HELP, description=HELP + ". Writes suspects.csv, metrics.json and index.html.")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a .pt file written by trainfluence train "
                   "(its epoch-E.pt siblings feed the tracin score)")
    add_data_args(p, from_checkpoint=True)
    p.add_argument("--score", nargs="+", default=None, metavar="NAME",
                   help=f"scores to compute and compare: {', '.join(SCORES)} (default: all; the first ranks)")
    p.add_argument("--rank-by", default=None, metavar="NAME", help="score that orders the report (default: the first --score)")
    p.add_argument("--top", type=int, default=d.top, help=f"suspects shown with thumbnails (default {d.top})")
    p.add_argument("--detail", type=int, default=d.detail, help=f"top suspects shown with helpful/harmful images (default {d.detail})")
    p.add_argument("--fix", type=int, default=0, metavar="K", help="relabel the top K suspects, retrain, compare with random and loss choices")
    p.add_argument("--tracin-space", default=d.tracin_space, choices=["logits", "params"],
                   help="tracin gradient at the outputs (default) or over --tracin-params")
    p.add_argument("--tracin-params", default=d.tracin_params, help="parameters for --tracin-space params (default all)")
    p.add_argument("--tracin-weights", default=d.tracin_weights, choices=["lr", "uniform"],
                   help=f"weight of each epoch checkpoint in tracin: its mean learning rate or 1 (default {d.tracin_weights})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline and random fix choice")
    p.add_argument("--out", default="runs/audit", help="output folder (default runs/audit)")
    add_influence_args(p, solver="exact", damping=0.01, params="last", hessian_samples=None)
    add_device_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = AuditSettings(scores=args.score or list(SCORES), rank_by=args.rank_by, top=args.top, detail=args.detail,
                             fix=args.fix, tracin_space=args.tracin_space, tracin_params=args.tracin_params,
                             tracin_weights=args.tracin_weights, seed=args.seed)
    settings.validate()
    ckpt, train, test, device = load_checkpoint_and_data(args)
    out = prepare_out(args.out)
    report = run_audit(ckpt, train, test, settings, lambda: engine_from_args(args, ckpt, train, device), Path(out), device)
    print(f"ranked {report['n']} training images by {report['rank_by']}")
    if "metrics" in report:
        print(f"{report['num_flipped']} planted flips; recall at 10% inspected / ROC AUC:")
        for name, m in report["metrics"].items():
            print(f"  {name:15s} {m['recall_at_10pct']:.3f} / {m['roc_auc']:.4f}")
    if "fix" in report:
        f = report["fix"]
        print(f"fix {f['k']}: test accuracy before {f['test_accuracy_before']:.4f}; after: " +
              ", ".join(f"{k} {v['test_accuracy_after']:.4f}" for k, v in f["methods"].items()))
    print(f"wrote {out / 'suspects.csv'}, {out / 'metrics.json'} and {out / 'index.html'}")
    return 0
