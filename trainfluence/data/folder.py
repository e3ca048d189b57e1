"""``folder:PATH`` — an image folder ``PATH/train/<class>/…`` and ``PATH/test/<class>/…`` (torchvision ImageFolder).

Images are converted to RGB, resized to ``image_size``×``image_size`` (default 32, bilinear) and normalised
with the ImageNet statistics (the convention pretrained torchvision models expect).  Each image's file path is
kept, so reports can name it.

A folder is data, not code: files are decoded by Pillow only.  An image whose header declares more than
:data:`MAX_PIXELS` pixels (a decompression bomb: a few kilobytes that expand to gigabytes) is refused before it
is decoded, and any unreadable file is a one-line error naming it.
"""

from __future__ import annotations

from pathlib import Path

import warnings

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
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # Pillow's own limit for one image


def read_image(file: str, size: int) -> np.ndarray:
    """Decode one image file to uint8 [size, size, 3] RGB, refusing decompression bombs before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise UserError(f"image {file} declares {im.width}x{im.height} pixels (over {MAX_PIXELS:,}: a "
                                    "decompression bomb?); remove or shrink the file")
                return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UserError(f"image {file} is too large to decode safely ({exc}); remove or shrink the file") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise UserError(f"cannot read image {file}: {exc}; remove or replace the file") from exc


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
    size = config.image_size if config.image_size is not None else DEFAULT_SIZE
    limit = config.train_size if split == "train" else config.test_size
    samples = folder.samples[: limit if limit is not None else len(folder.samples)]
    images = np.empty((len(samples), size, size, 3), dtype=np.uint8)
    for i, (file, _) in enumerate(bar(samples, desc=f"reading {split} images", unit="img")):
        images[i] = read_image(file, size)
    labels = torch.tensor([t for _, t in samples], dtype=torch.int64)
    return RawSplit(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels, list(folder.classes),
                    IMAGENET_MEAN, IMAGENET_STD, paths=[str(Path(f)) for f, _ in samples])
