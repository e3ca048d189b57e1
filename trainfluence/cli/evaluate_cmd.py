"""``trainfluence evaluate``: accuracy and loss of a checkpoint on a dataset."""

from __future__ import annotations

import argparse

from .common import add_checkpoint_args, add_device_arg, load_checkpoint_and_data

HELP = "print a checkpoint's train and test accuracy on a dataset"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help=HELP, description=HELP + ".")
    add_checkpoint_args(p)
    add_device_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..train import evaluate

    ckpt, train, test, device = load_checkpoint_and_data(args)
    for split in (train, test):
        m = evaluate(ckpt.model, split, device)
        print(f"{split.describe()}: accuracy {m['accuracy']:.4f}, loss {m['loss']:.4f}")
    return 0
