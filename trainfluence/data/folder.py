"""``folder:PATH`` — an image folder ``PATH/train/<class>/…`` and ``PATH/test/<class>/…`` (torchvision ImageFolder).

Images are converted to RGB, resized to ``image_size``×``image_size`` (default 32, bilinear) and normalised
with the ImageNet statistics (the convention pretrained torchvision models expect).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..progress import bar
from .base import DataConfig
from .torchvision_sets import RawSplit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = 32


def load_folder(path: str, split: str, config: DataConfig) -> RawSplit:
    from torchvision.datasets import ImageFolder

    root = Path(path).expanduser()
    split_dir = root / split
    if not split_dir.is_dir():
        raise UserError(f"image folder {split_dir} not found: folder:PATH needs PATH/train/<class>/ and PATH/test/<class>/")
    try:
        folder = ImageFolder(str(split_dir), loader=lambda p: p)  # we decode ourselves, with clear errors
    except (FileNotFoundError, RuntimeError) as exc:
        raise UserError(f"no class folders with images in {split_dir}: {exc}") from exc
    train_classes = folder.classes
    if split == "test" and (root / "train").is_dir():
        train_classes = ImageFolder(str(root / "train"), loader=lambda p: p).classes
        if train_classes != folder.classes:
            raise UserError(f"{split_dir} has classes {folder.classes} but {root / 'train'} has {train_classes}: they must match")
    size = config.image_size or DEFAULT_SIZE
    n = len(folder.samples)
    if config_limit := (config.train_size if split == "train" else config.test_size):
        n = min(n, config_limit)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, (file, _) in enumerate(bar(folder.samples[:n], desc=f"reading {split} images", unit="img")):
        try:
            with Image.open(file) as im:
                images[i] = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
        except (OSError, ValueError, SyntaxError) as exc:
            raise UserError(f"cannot read image {file}: {exc}; remove or replace the file") from exc
    labels = torch.tensor([t for _, t in folder.samples[:n]], dtype=torch.int64)
    return RawSplit(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels, list(folder.classes),
                    IMAGENET_MEAN, IMAGENET_STD)
