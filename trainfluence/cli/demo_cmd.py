"""``trainfluence demo``: everything trainfluence does, on the embedded data, in one command and one report."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_device_arg, prepare_out
from .flags import alias

HELP = "run the whole pipeline on the embedded shapes data (10% planted label noise) and write one HTML report"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help=HELP.replace("%", "%%"),
                       description=HELP + " (see README for the time on 2 CPU cores; --quick: the same on less data).")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="the same pipeline on 1,500 training images, 8 epochs (under a minute)")
    alias(p, "--small", "--quick", dest="quick", nargs=0)
    p.add_argument("--cache-dir", default="cache", help="where the gradient store goes (default cache/)")
    add_device_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import DemoSettings, run_demo
    from ..device import resolve_device

    settings = DemoSettings.quick() if args.quick else DemoSettings()
    out = prepare_out(args.out)
    s = run_demo(Path(out), settings, resolve_device(args.device), Path(args.cache_dir))
    print("\ntrainfluence demo — summary")
    print(f"  test accuracy                       {s['test_accuracy']:.4f}")
    print(f"  audit: flipped labels in top 10%    {s['audit_recall_at_10pct']:.3f} (ranked by {s['audit_rank_by']}; ROC AUC {s['audit_roc_auc']:.4f})")
    b = s["saliency_best"]
    print(f"  saliency: best method {b['method']}: pointing accuracy {b['pointing']:.3f}, mean box IoU {b['box_iou']:.3f}, "
          f"deletion AUC {b['deletion_auc']:.3f}, insertion AUC {b['insertion_auc']:.3f}")
    print("  time per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in s["seconds"].items()) + f"; total {s['total_seconds']:.1f} s")
    print(f"  report: {out / 'index.html'}")
    return 0
