"""Checkpoints: a ``state_dict``, the metadata every later stage needs to rebuild the model, its data and its
training objective, the SHA-256 of the tensors, and (for resuming) the optimiser's state.

Loading is a trust boundary.  ``torch.load(weights_only=True)`` reads tensors and plain values only; the metadata
is validated (ranges, a *registered* architecture — ``module:callable`` only when the caller passes ``arch``; a
dataset spec, never a download); the tensors must match the checksum written with them (flipped bytes are
refused) and must be finite.  Every problem is a one-line :class:`~trainfluence.errors.UserError`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checks import require_finite
from .data import DataConfig, ImageDataset
from .errors import UserError
from .files import save_with
from .fingerprint import fingerprint
from .models import build_model
from .settings import from_dict, to_dict, validate

FORMAT = "trainfluence-checkpoint-2"


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
    run_id: str = ""  # one id per `train` run: TracIn never mixes checkpoints of different runs
    dynamics: dict[str, Any] = field(default_factory=dict)  # this epoch's logits record (trainfluence.dynamics)

    @property
    def data_config(self) -> DataConfig:
        """The dataset it was trained on — with ``download`` off: a checkpoint never enables a download."""
        return dataclasses.replace(from_dict(DataConfig, self.data), download=False)

    @property
    def weight_decay(self) -> float:
        return float(self.optimizer.get("weight_decay", 0.0))

    def check(self, path: Path) -> None:
        """Refuse metadata no trainfluence run writes (each field in range), so a crafted file cannot make the
        engine allocate absurd models or read arbitrary settings."""
        def bad(what: str) -> UserError:
            return UserError(f"checkpoint {path} has invalid metadata ({what}): pass a .pt file written by trainfluence train")

        ints = {"num_classes": (1, 100_000), "in_channels": (1, 64), "image_size": (1, 4096), "epoch": (0, 10**6)}
        for name, (lo, hi) in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise bad(f"{name} = {value!r}")
        if not isinstance(self.arch, str) or not isinstance(self.classes, list) or len(self.classes) != self.num_classes \
                or not all(isinstance(c, str) for c in self.classes):
            raise bad("arch or class names")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if not isinstance(values, list) or len(values) != self.in_channels or \
                    not all(isinstance(v, (int, float)) and abs(v) < 1e6 for v in values):
                raise bad(name)
        if not all(v > 0 for v in self.std):
            raise bad("std")
        wd = self.optimizer.get("weight_decay", 0.0) if isinstance(self.optimizer, dict) else None
        if not isinstance(wd, (int, float)) or not 0 <= wd < 1e6:
            raise bad("weight decay")
        if not isinstance(self.data, dict):
            raise bad("data")
        try:
            validate(from_dict(DataConfig, self.data))
        except (UserError, TypeError) as exc:
            raise bad(f"data: {exc}") from None


@dataclass
class Checkpoint:
    model: nn.Module
    meta: CheckpointMeta
    path: Path
    content_hash: str  # fingerprint of the parameters and buffers (what the gradients depend on)
    train_state: dict[str, Any] | None = None  # optimiser and RNG state, for `train --resume`


def state_fingerprint(state: dict[str, torch.Tensor], length: int | None = None) -> str:
    """SHA-256 over the names and tensors of a state dict, in name order."""
    return fingerprint(*(part for name in sorted(state) for part in (name, state[name])), length=length)


def model_fingerprint(model: nn.Module) -> str:
    """The 16-hex-digit identity of a model's parameters and buffers (store keys, cached results)."""
    return state_fingerprint(model.state_dict(), 16)


def save_checkpoint(path: str | Path, model: nn.Module, meta: CheckpointMeta,
                    train_state: dict[str, Any] | None = None) -> Path:
    """Write atomically (temporary name with the process id, then rename), with the tensors' SHA-256."""
    # the default layout whatever the training ran in (a channels-last run writes the same file)
    state = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()}
    blob: dict[str, Any] = {"format": FORMAT, "state_dict": state, "sha256": state_fingerprint(state), "meta": to_dict(meta)}
    if train_state is not None:
        blob["train_state"] = train_state
    return save_with(path, lambda tmp: torch.save(blob, tmp))


def load_checkpoint(path: str | Path, *, device: torch.device | str = "cpu", arch: str | None = None,
                    train_state: bool = False) -> Checkpoint:
    """Load, verify and rebuild the model (eval mode) on ``device``.

    ``arch``: the architecture to build, given by the caller — the only way a ``module:callable`` factory runs
    (default: the checkpoint's, which must be registered).  ``train_state``: also return the optimiser state."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: train one with `trainfluence train --out DIR` (it writes DIR/final.pt)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for non-checkpoint or corrupted files
        raise UserError(f"{path} is not a readable checkpoint ({type(exc).__name__}): pass a .pt file written by "
                        "trainfluence train (a damaged file must be written again)") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or not isinstance(blob.get("state_dict"), dict):
        raise UserError(f"{path} is not a trainfluence checkpoint: pass a .pt file written by trainfluence train")
    try:
        meta = from_dict(CheckpointMeta, blob["meta"])
    except (TypeError, KeyError) as exc:
        raise UserError(f"checkpoint {path} has incomplete metadata: pass a .pt file written by trainfluence train") from exc
    meta.check(path)
    state = blob["state_dict"]
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UserError(f"checkpoint {path} holds something other than named tensors")
    digest = state_fingerprint(state)
    if blob.get("sha256") != digest:
        raise UserError(f"checkpoint {path} is corrupted: its tensors do not match the checksum written with them "
                        "(copy or download it again, or retrain)")
    for name, tensor in state.items():
        if tensor.is_floating_point():
            require_finite(tensor, f"weight {name!r} of checkpoint {path}",
                           "its training diverged — retrain with a lower --lr")
    model = build_model(arch or meta.arch, meta.num_classes, meta.in_channels, meta.image_size, trusted=arch is not None)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"checkpoint {path} does not fit architecture {arch or meta.arch!r}: {first}") from exc
    model.to(device).eval()
    return Checkpoint(model, meta, path, digest[:16], blob.get("train_state") if train_state else None)


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
