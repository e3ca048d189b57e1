"""The dataset object every stage consumes, and the settings that rebuild it.

An :class:`ImageDataset` keeps its images as a compact uint8 tensor ``[n, C, H, W]`` in memory and returns
``(image_tensor, label)`` items in the torchvision convention: float, ``(x/255 − mean)/std`` per channel.
It also exposes the underlying index of each item in its source, the class names, the normalisation, the
ground-truth boxes and object masks (shapes only) and the planted label-noise record (training split only).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..fingerprint import fingerprint
from ..settings.data import DataConfig


@dataclass
class NoiseRecord:
    """Planted label noise: which training labels were flipped, from what, to what."""

    rate: float
    seed: int
    indices: list[int]  # positions in the dataset, sorted
    original_labels: list[int]
    noisy_labels: list[int]
    kind: str = "uniform"  # uniform | asymmetric | instance (trainfluence.data.noise)


@dataclass(eq=False)
class ImageDataset(Dataset):
    images: torch.Tensor  # uint8 [n, C, H, W]
    labels: torch.Tensor  # int64 [n] (noisy where noise was planted)
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    config: DataConfig
    split: str  # "train" | "test"
    index: np.ndarray  # position of each item in its source dataset
    boxes: torch.Tensor | None = None  # int64 [n, 4] (x0, y0, x1, y1) inclusive, where known
    masks: torch.Tensor | None = None  # bool [n, H, W] object pixels, where known (shapes)
    noise: NoiseRecord | None = None
    clean_labels: torch.Tensor | None = None  # labels before noise, where noise was planted
    paths: list[str] | None = None  # the file of each item (folder datasets), shown beside its index in reports
    _fingerprint: str | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.normalize(self.images[i]), int(self.labels[i])

    @property
    def targets(self) -> torch.Tensor:
        """torchvision's name for the labels."""
        return self.labels

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (-1, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=like.device).view(shape)
        std = torch.tensor(self.std, dtype=torch.float32, device=like.device).view(shape)
        return mean, std

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (any leading shape) → normalised float images."""
        mean, std = self._stats(pixels)
        return (pixels.float() / 255.0 - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images → floats in [0, 1] for display."""
        mean, std = self._stats(x)
        return (x * std + mean).clamp(0, 1)

    def tensors(
        self, indices: np.ndarray | list[int] | slice | None = None, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch ``(x, y)``: normalised float images and labels, for the given positions (all by default)."""
        sel = slice(None) if indices is None else indices
        if not isinstance(sel, slice):
            sel = torch.as_tensor(np.asarray(sel), dtype=torch.long)
        x = self.normalize(self.images[sel].to(device))
        return x, self.labels[sel].to(device)

    def fingerprint(self) -> str:
        """SHA-256 over the content-deciding settings, split, pixels and labels (noise included)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.config.identity(), self.split, self.images, self.labels)
        return self._fingerprint

    def relabeled(self, indices: Any, labels: Any) -> "ImageDataset":
        """A copy whose labels at ``indices`` are ``labels`` (its fingerprint follows the new labels)."""
        new = self.labels.clone()
        new[torch.as_tensor(np.asarray(indices), dtype=torch.long)] = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        return dataclasses.replace(self, labels=new, _fingerprint=None)

    def subset(self, indices: Any) -> "ImageDataset":
        """The items at ``indices`` as a dataset of their own (planted-noise records are dropped: their positions
        refer to the whole set)."""
        sel = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        pick = (lambda t: t[sel] if t is not None else None)
        return dataclasses.replace(self, images=self.images[sel], labels=self.labels[sel], index=self.index[sel.numpy()],
                                   boxes=pick(self.boxes), masks=pick(self.masks), noise=None, clean_labels=None,
                                   paths=[self.paths[i] for i in sel.tolist()] if self.paths is not None else None,
                                   _fingerprint=None)

    def describe_item(self, i: int) -> dict[str, Any]:
        """How reports name item ``i``: its index, and its file where it has one."""
        return {"index": int(i), **({"path": self.paths[int(i)]} if self.paths is not None else {})}

    def describe(self) -> str:
        c, h, w = self.image_shape
        noise = f", {len(self.noise.indices)} labels flipped" if self.noise else ""
        return f"{self.config.spec} {self.split}: {len(self)} images {c}x{h}x{w}, {self.num_classes} classes{noise}"
