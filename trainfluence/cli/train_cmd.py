"""``trainfluence train``: train a model, a checkpoint per epoch."""

from __future__ import annotations

import argparse

from ..device import resolve_device
from ..train import TrainConfig, train
from .common import add_data_args, add_device_arg, data_config, load_splits, prepare_out

HELP = "train a model on a dataset, writing a checkpoint per epoch and metrics.json"


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = TrainConfig()
    p = sub.add_parser("train", help=HELP, description=HELP + ". Prints train/test accuracy.")
    add_data_args(p)
    g = p.add_argument_group("training")
    g.add_argument("--arch", default=d.arch, help="cnn (default, ~50k params) | logreg | mlp | resnet18 | module:callable")
    g.add_argument("--epochs", type=int, default=d.epochs, help=f"(default {d.epochs})")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"(default {d.batch_size})")
    g.add_argument("--optimizer", default=d.optimizer, choices=["adam", "sgd"], help=f"(default {d.optimizer})")
    g.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    g.add_argument("--momentum", type=float, default=d.momentum, help=f"sgd momentum (default {d.momentum})")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"L2 coefficient wd in (wd/2)|θ|² (default {d.weight_decay})")
    g.add_argument("--schedule", default=d.schedule, choices=["cosine", "constant"], help=f"(default {d.schedule})")
    g.add_argument("--seed", type=int, default=d.seed, help="training seed: initialisation and batch order (default 0)")
    p.add_argument("--out", default="runs/train", help="output folder (default runs/train)")
    add_device_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    cfg = TrainConfig(arch=args.arch, epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                      momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule, seed=args.seed)
    cfg.validate()
    device = resolve_device(args.device)
    train_set, test_set = load_splits(data_config(args))
    out = prepare_out(args.out)
    print(f"{train_set.describe()}; {test_set.describe()}; device {device}")
    result = train(cfg, train_set, test_set, out, device)
    print(f"train accuracy {result['train_accuracy']:.4f}  test accuracy {result['test_accuracy']:.4f}  "
          f"({result['parameters']:,} parameters, {result['seconds']:.1f} s)")
    print(f"checkpoints and metrics.json in {out}/ (final checkpoint: {out / 'final.pt'})")
    return 0
