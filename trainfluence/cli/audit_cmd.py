"""``trainfluence audit``: which training labels are wrong?"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..settings.audit import AuditSettings
from ..settings.influence import InfluenceSettings, StoreSettings
from .common import add_checkpoint_args, add_device_arg, add_out_arg, load_checkpoint_and_data, prepare_out
from .flags import add_settings, settings_from
from .influence_args import add_influence_args, engine_from_args, solver_options

HELP = "rank training examples as likely label errors, suggest labels, measure against planted noise"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help=HELP, description=HELP + ". Writes suspects.csv, metrics.json and index.html. "
                       "The default ranking, fused, averages the ranks of the signals that measured best across noise "
                       "kinds, rates and training lengths (BENCHMARKS.md). aum, forgetting and avg_loss read the "
                       "training dynamics (epoch-E.logits.npy) and tracin the epoch-E.pt checkpoints that `train` "
                       "writes beside --checkpoint. How many to review is estimated by confident learning on the "
                       "epoch-averaged probabilities: the suggested cut (within_cut in suspects.csv).")
    add_checkpoint_args(p, several=True)
    add_settings(p.add_argument_group("audit"), AuditSettings)
    add_out_arg(p, "runs/audit")
    add_influence_args(p)
    add_device_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args, AuditSettings)
    solver_options(args, settings_from(args, InfluenceSettings).solver)
    settings_from(args, StoreSettings)
    from ..audit import run_audit

    ckpt, train, test, device = load_checkpoint_and_data(args)
    out = prepare_out(args.out)
    report = run_audit(ckpt, train, test, settings, lambda: engine_from_args(args, ckpt, train, device), Path(out),
                       device, arch=args.arch)
    print(f"ranked {report['n']} training images by {report['rank_by']}")
    est = report["noise_estimate"]
    print((f"noise rate not estimated: {est['refusal']}" if est["refusal"] else
           f"estimated noise rate {est['rate']:.1%}: review the top {est['count']} (the suggested cut)")
          + (f"; planted {est['true_rate']:.1%}" if "true_rate" in est else ""))
    acc = report.get("suggestion_accuracy")
    if acc and acc["suggested_is_original"] is not None:
        print(f"suggested labels restore the original for {acc['suggested_is_original']:.1%} of the "
              f"{acc['flipped_in_cut']} planted flips within the cut")
    for note in report["notes"]:
        print(f"note: {note}")
    if report.get("gradient_store"):
        print(f"gradient store: {report['gradient_store']}")
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
