"""Datasets, selected by a spec string: ``shapes`` (embedded default), ``mnist``, ``fashion-mnist``,
``cifar10`` (torchvision, from ``--data-root``), ``folder:PATH`` (an image folder).

    >>> train = load_dataset(DataConfig("shapes", label_noise=0.1), "train")
    >>> x, y = train[0]            # normalised float image, int label

The registry :data:`DATASETS` maps a spec's name to a loader ``(argument, split, config) -> RawSplit``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import UserError
from ..settings import validate
from ..settings.data import DATASET_NAMES, SHAPES_DEFAULTS, DataConfig, parse_spec
from . import shapes
from .base import ImageDataset, NoiseRecord
from .folder import load_folder
from .noise import flip_labels
from .torchvision_sets import TORCHVISION_SETS, RawSplit, load_torchvision


def load_shapes(arg: str | None, split: str, config: DataConfig) -> RawSplit:
    key = "train_size" if split == "train" else "test_size"
    n = getattr(config, key) if getattr(config, key) is not None else SHAPES_DEFAULTS[key]
    size = config.image_size if config.image_size is not None else SHAPES_DEFAULTS["image_size"]
    gen = shapes.generate(n, size=size, seed=config.seed, stream=0 if split == "train" else 1)
    return RawSplit(gen.images, gen.labels, list(shapes.CLASSES), shapes.MEAN, shapes.STD, gen.boxes, gen.masks)


def _torchvision_loader(name: str) -> Callable[[str | None, str, DataConfig], RawSplit]:
    return lambda arg, split, config: load_torchvision(name, split, config)


DATASETS: dict[str, Callable[[str | None, str, DataConfig], RawSplit]] = {
    "shapes": load_shapes,
    **{name: _torchvision_loader(name) for name in TORCHVISION_SETS},
    "folder": lambda arg, split, config: load_folder(arg or "", split, config),
}
assert tuple(DATASETS) == DATASET_NAMES, "settings.data.DATASET_NAMES names the registry"


def load_dataset(config: DataConfig, split: str = "train") -> ImageDataset:
    """Load one split; label noise (if any) is planted in the training split only."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    validate(config)
    name, arg = parse_spec(config.spec)
    raw = DATASETS[name](arg, split, config)
    limit = config.train_size if split == "train" else config.test_size
    if limit is not None and name != "shapes":
        raw.images, raw.labels = raw.images[:limit], raw.labels[:limit]
        raw.paths = raw.paths[:limit] if raw.paths is not None else None
    n = int(raw.labels.shape[0])
    if n == 0:
        raise UserError(f"the {split} split of {config.spec!r} has no images")
    labels, noise, clean = raw.labels, None, None
    if split == "train" and config.label_noise:
        clean = raw.labels
        labels, noise = flip_labels(raw.labels, len(raw.classes), config.label_noise, config.noise_seed,
                                   config.noise_kind, raw.images)
    return ImageDataset(
        images=raw.images, labels=labels, classes=raw.classes, mean=tuple(raw.mean), std=tuple(raw.std),
        config=config, split=split, index=np.arange(n), boxes=raw.boxes, masks=raw.masks, noise=noise,
        clean_labels=clean, paths=raw.paths,
    )


__all__ = ["DATASETS", "DataConfig", "ImageDataset", "NoiseRecord", "flip_labels", "load_dataset", "parse_spec"]
