"""Anything that yields ``(input, label)`` as a uniform source of tensor batches with a content fingerprint.

The influence engine accepts an :class:`~trainfluence.data.ImageDataset`, any map-style dataset of
``(input, label)`` items, or an ``(inputs, labels)`` tensor pair; :func:`as_source` turns each into an object
with ``len()``, ``tensors(indices)`` and ``fingerprint()``.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from ..checks import require_finite
from ..errors import UserError
from ..fingerprint import fingerprint
from ..progress import bar
from .base import ImageDataset


class ExampleSource(Protocol):
    def __len__(self) -> int: ...
    def tensors(self, indices: Any = None, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]: ...
    def fingerprint(self) -> str: ...


class TensorSource:
    """In-memory ``(inputs, labels)``."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor):
        if len(inputs) != len(labels):
            raise UserError(f"inputs and labels differ in length: {len(inputs)} vs {len(labels)}")
        self.inputs = inputs if inputs.is_floating_point() else inputs.float()
        self.labels = labels.long().reshape(-1)
        require_finite(self.inputs, "the inputs", "clean the data (NaN or Inf pixels)")
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def tensors(self, indices: Any = None, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        sel = slice(None) if indices is None else indices
        if not isinstance(sel, slice):
            sel = torch.as_tensor(np.asarray(sel), dtype=torch.long)
        return self.inputs[sel].to(device), self.labels[sel].to(device)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.inputs, self.labels)
        return self._fingerprint


def as_source(data: Any) -> ExampleSource:
    """An :class:`ImageDataset`, an ``(inputs, labels)`` pair of tensors, or a dataset of ``(input, label)``."""
    if isinstance(data, (ImageDataset, TensorSource)):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return TensorSource(torch.as_tensor(data[0]), torch.as_tensor(data[1]))
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        xs, ys = [], []
        for i in bar(range(len(data)), desc="reading dataset", unit="item"):
            x, y = data[i]
            xs.append(torch.as_tensor(x))
            ys.append(int(y))
        if not xs:
            raise UserError("the dataset is empty")
        return TensorSource(torch.stack(xs), torch.tensor(ys))
    raise UserError(f"cannot read examples from {type(data).__name__}: pass a dataset of (input, label) or a (inputs, labels) pair")
