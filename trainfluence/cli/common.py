"""Arguments shared by several commands, and the helpers that turn them into datasets and checkpoints."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, check_compatible, load_checkpoint
from ..data import DataConfig, ImageDataset, load_dataset
from ..device import resolve_device
from ..errors import UserError
from ..settings import write_json

# DataConfig field → argparse dest
DATA_FIELDS = {"spec": "spec", "data_root": "data_root", "download": "download", "image_size": "image_size",
               "train_size": "train_size", "test_size": "test_size", "seed": "data_seed", "label_noise": "label_noise",
               "noise_seed": "noise_seed"}


def add_data_args(p: argparse.ArgumentParser, *, from_checkpoint: bool = False) -> None:
    """Dataset options.  With ``from_checkpoint`` every option defaults to what the checkpoint was trained on."""
    note = " (default: the checkpoint's)" if from_checkpoint else ""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", dest="spec", metavar="SPEC", default=None if from_checkpoint else "shapes",
                   help=f"shapes | mnist | fashion-mnist | cifar10 | folder:PATH{note or ' (default: shapes, embedded)'}")
    g.add_argument("--data-root", default=None, metavar="DIR", help="folder holding torchvision datasets (default: data)")
    g.add_argument("--download", action="store_true", default=None, help="let torchvision download missing dataset files")
    g.add_argument("--image-size", type=int, default=None, metavar="S", help=f"shapes: generated size; folder: resize to S (default 32){note}")
    g.add_argument("--train-size", type=int, default=None, metavar="N", help=f"shapes: images generated (default 6000); others: first N{note}")
    g.add_argument("--test-size", type=int, default=None, metavar="N", help=f"shapes: images generated (default 1200); others: first N{note}")
    g.add_argument("--data-seed", type=int, default=None, metavar="S", help=f"shapes generator seed (default 0){note}")
    g.add_argument("--label-noise", type=float, default=None, metavar="RATE", help=f"flip exactly round(RATE*n) training labels (default 0){note}")
    g.add_argument("--noise-seed", type=int, default=None, metavar="S", help=f"seed of the flipped labels (default 0){note}")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N (default: auto)")


def data_config(args: argparse.Namespace, base: DataConfig | None = None) -> DataConfig:
    """Merge command-line data options over ``base`` (the checkpoint's settings) or the defaults."""
    cfg = base or DataConfig()
    changes = {f: getattr(args, dest) for f, dest in DATA_FIELDS.items() if getattr(args, dest, None) is not None}
    if "spec" in changes and base is not None and changes["spec"] != base.spec:
        # another dataset: the checkpoint's sizes and noise do not carry over
        cfg = replace(DataConfig(), data_root=base.data_root)
    return replace(cfg, **changes)


def load_splits(cfg: DataConfig) -> tuple[ImageDataset, ImageDataset]:
    return load_dataset(cfg, "train"), load_dataset(cfg, "test")


def load_checkpoint_and_data(args: argparse.Namespace) -> tuple[Checkpoint, ImageDataset, ImageDataset, torch.device]:
    """``--checkpoint`` plus data options → (checkpoint on the device, train split, test split, device)."""
    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, device=device)
    train, test = load_splits(data_config(args, ckpt.meta.data_config))
    check_compatible(ckpt.meta, train)
    return ckpt, train, test, device


def prepare_out(path: str | Path) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder: choose another path")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_noise_record(out: Path, dataset: ImageDataset) -> None:
    if dataset.noise is not None:
        write_json(out / "noise.json", dataset.noise)
