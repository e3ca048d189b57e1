"""Checkpoints: a ``state_dict`` plus the metadata every later stage needs to rebuild the model, its data and
its training objective (architecture, classes, dataset settings, normalisation, epoch, optimiser settings
including weight decay and learning rate).  Saved with ``torch.save``; loaded with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import DataConfig, ImageDataset
from .errors import UserError
from .models import build_model
from .settings import from_dict, to_dict


@dataclass
class CheckpointMeta:
    arch: str
    num_classes: int
    in_channels: int
    image_size: int
    classes: list[str]
    data: dict[str, Any]  # DataConfig as a dict
    mean: list[float]
    std: list[float]
    epoch: int
    optimizer: dict[str, Any] = field(default_factory=dict)  # name, lr (at this epoch), momentum, weight_decay, ...
    metrics: dict[str, Any] = field(default_factory=dict)
    train_config: dict[str, Any] = field(default_factory=dict)  # TrainConfig as a dict (to retrain the same way)

    @property
    def data_config(self) -> DataConfig:
        return from_dict(DataConfig, self.data)

    @property
    def weight_decay(self) -> float:
        return float(self.optimizer.get("weight_decay", 0.0))


@dataclass
class Checkpoint:
    model: nn.Module
    meta: CheckpointMeta
    path: Path
    content_hash: str  # SHA-256 of the parameters and buffers (what the gradients depend on)


def state_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_checkpoint(path: str | Path, model: nn.Module, meta: CheckpointMeta) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"format": "trainfluence-checkpoint-1", "state_dict": state, "meta": to_dict(meta)}, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path, *, device: torch.device | str = "cpu") -> Checkpoint:
    """Load and rebuild the model (eval mode).  Errors are one-line :class:`UserError`s."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: train one with `trainfluence train --out DIR` (it writes DIR/final.pt)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for non-checkpoint files
        raise UserError(f"{path} is not a readable checkpoint ({type(exc).__name__}): pass a .pt file written by trainfluence train") from exc
    if not isinstance(blob, dict) or blob.get("format") != "trainfluence-checkpoint-1":
        raise UserError(f"{path} is not a trainfluence checkpoint: pass a .pt file written by trainfluence train")
    meta = from_dict(CheckpointMeta, blob["meta"])
    model = build_model(meta.arch, meta.num_classes, meta.in_channels, meta.image_size)
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"checkpoint {path} does not fit architecture {meta.arch!r}: {first}") from exc
    model.to(device).eval()
    return Checkpoint(model, meta, path, state_hash(model))


def check_compatible(meta: CheckpointMeta, dataset: ImageDataset) -> None:
    """Refuse a dataset whose classes or image shape differ from what the checkpoint was trained on."""
    if dataset.num_classes != meta.num_classes:
        raise UserError(
            f"checkpoint was trained for {meta.num_classes} classes but dataset {dataset.config.spec!r} has "
            f"{dataset.num_classes}: pass the dataset it was trained on (or omit --dataset to use it)"
        )
    c, h, _ = dataset.image_shape
    if c != meta.in_channels or h != meta.image_size:
        raise UserError(
            f"checkpoint expects {meta.in_channels}x{meta.image_size}x{meta.image_size} images but dataset "
            f"{dataset.config.spec!r} gives {c}x{h}x{h}: pass --image-size {meta.image_size} or the training dataset"
        )
