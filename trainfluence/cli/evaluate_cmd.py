"""``trainfluence evaluate``: accuracy and loss of a checkpoint on a dataset."""

from __future__ import annotations

import argparse

from ..train import evaluate
from .common import add_data_args, add_device_arg, load_checkpoint_and_data

HELP = "print a checkpoint's train and test accuracy on a dataset"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help=HELP, description=HELP + ".")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a .pt file written by trainfluence train")
    add_data_args(p, from_checkpoint=True)
    add_device_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    ckpt, train, test, device = load_checkpoint_and_data(args)
    for split in (train, test):
        m = evaluate(ckpt.model, split, device)
        print(f"{split.describe()}: accuracy {m['accuracy']:.4f}, loss {m['loss']:.4f}")
    return 0
