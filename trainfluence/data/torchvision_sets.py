"""MNIST, Fashion-MNIST and CIFAR-10 through torchvision's own classes, reading ``--data-root``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .base import DataConfig


@dataclass
class RawSplit:
    images: torch.Tensor  # uint8 [n, C, H, W]
    labels: torch.Tensor  # int64 [n]
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    boxes: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    paths: list[str] | None = None  # file of each image (folder datasets)


# name → (torchvision class name, folder torchvision looks in, mean, std)
TORCHVISION_SETS = {
    "mnist": ("MNIST", "MNIST/raw", (0.1307,), (0.3081,)),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw", (0.2860,), (0.3530,)),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def load_torchvision(name: str, split: str, config: DataConfig) -> RawSplit:
    import torchvision.datasets as tvd

    cls_name, folder, mean, std = TORCHVISION_SETS[name]
    root = Path(config.data_root).expanduser()
    try:
        ds = getattr(tvd, cls_name)(root=str(root), train=(split == "train"), download=config.download)
    except RuntimeError as exc:
        if config.download:
            raise UserError(f"could not download {name} into {root}: {exc}") from exc
        raise UserError(
            f"{name} files not found at {root / folder}: pass --data-root DIR (the folder that contains "
            f"{folder.split('/')[0]}/) or add --download to fetch them"
        ) from exc
    data = ds.data if isinstance(ds.data, torch.Tensor) else torch.from_numpy(np.asarray(ds.data))
    images = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
    labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    return RawSplit(images.contiguous(), labels, list(ds.classes), mean, std)
