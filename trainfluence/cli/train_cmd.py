"""``trainfluence train``: train a model, a checkpoint per epoch (``--resume`` continues an interrupted run)."""

from __future__ import annotations

import argparse

from ..settings.train import TrainConfig
from .common import add_data_args, add_device_arg, add_out_arg, data_config, load_splits, prepare_out
from .flags import add_settings, settings_from

HELP = "train a model on a dataset, writing a checkpoint per epoch and metrics.json"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help=HELP, description=HELP + ". Prints train/test accuracy.")
    add_data_args(p)
    add_settings(p.add_argument_group("training"), TrainConfig)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch checkpoint "
                   "(same flags; ends bit for bit where the uninterrupted run would)")
    add_out_arg(p, "runs/train")
    add_device_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    cfg = settings_from(args, TrainConfig)
    data = data_config(args)
    from ..device import resolve_device
    from ..train import train

    device = resolve_device(args.device)
    train_set, test_set = load_splits(data)
    out = prepare_out(args.out)
    print(f"{train_set.describe()}; {test_set.describe()}; device {device}")
    result = train(cfg, train_set, test_set, out, device, resume=args.resume)
    print(f"train accuracy {result['train_accuracy']:.4f}  test accuracy {result['test_accuracy']:.4f}  "
          f"({result['parameters']:,} parameters, {result['seconds']:.1f} s; run {result['run_id']})")
    print(f"checkpoints and metrics.json in {out}/ (final checkpoint: {out / 'final.pt'})")
    return 0
