"""Arguments shared by several commands, and the helpers that turn them into datasets and checkpoints.

Nothing heavy is imported at module level: parsers are built (and bad flags refused) before torch loads."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..settings import validate
from ..settings.data import DataConfig
from .flags import add_settings, given


def add_data_args(p: argparse.ArgumentParser, *, from_checkpoint: bool = False) -> None:
    """Dataset options.  With ``from_checkpoint`` every option defaults to what the checkpoint was trained on."""
    g = p.add_argument_group("data")
    if from_checkpoint:
        add_settings(g, DataConfig, default_text="the checkpoint's", defaults={"download": "off"})
    else:
        add_settings(g, DataConfig)


def add_checkpoint_args(p: argparse.ArgumentParser, *, several: bool = False) -> None:
    if several:
        p.add_argument("--checkpoint", required=True, nargs="+", metavar="CKPT",
                       help="a .pt file written by trainfluence train; several (independent trainings, or epochs of one) "
                            "average their influence scores — an ensemble (data settings come from the first), each "
                            "member costing one model's time. A run's own epoch checkpoints (RUN/epoch-*.pt) need no "
                            "further training and lifted LDS about as much as five trainings in BENCHMARKS.md; the first "
                            "epoch's (RUN/epoch-1.pt) beside the final one gave most of that")
    else:
        p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a .pt file written by trainfluence train")
    p.add_argument("--arch", default=None, metavar="MODULE:CALLABLE",
                   help="build the checkpoint's model with this factory — needed when the checkpoint names your own "
                        "module:callable architecture: a checkpoint alone never makes trainfluence import code")
    add_data_args(p, from_checkpoint=True)


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N (default auto)")


def add_out_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--out", default=default, metavar="DIR", help=f"output folder (default {default})")


def data_config(args: argparse.Namespace, base: DataConfig | None = None) -> DataConfig:
    """The data options given on the command line over ``base`` (the checkpoint's settings) or the defaults."""
    cfg = base or DataConfig()
    changes = given(args, DataConfig)
    if "spec" in changes and base is not None and changes["spec"] != base.spec:
        cfg = dataclasses.replace(DataConfig(), data_root=base.data_root)  # other data: sizes and noise don't carry over
    return validate(dataclasses.replace(cfg, **changes))


def load_splits(cfg: DataConfig) -> tuple[Any, Any]:
    from ..data import load_dataset

    return load_dataset(cfg, "train"), load_dataset(cfg, "test")


def load_checkpoint_and_data(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """``--checkpoint`` plus data options → (checkpoint on the device, train split, test split, device)."""
    from ..checkpoint import check_compatible, load_checkpoint
    from ..device import resolve_device

    device = resolve_device(args.device)
    path = args.checkpoint[0] if isinstance(args.checkpoint, list) else args.checkpoint
    ckpt = load_checkpoint(path, device=device, arch=args.arch)
    train, test = load_splits(data_config(args, ckpt.meta.data_config))
    check_compatible(ckpt.meta, train)
    return ckpt, train, test, device


def prepare_out(path: str | Path) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder: choose another path")
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_indices(indices: list[int], size: int, flag: str, what: str) -> None:
    bad = [i for i in indices if not 0 <= i < size]
    if bad:
        raise UserError(f"{flag} {bad[0]} is out of range: {what} has {size} images (0..{size - 1})")
