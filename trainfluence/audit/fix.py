"""Koh & Liang's fix experiment: relabel K training examples, retrain with the same settings, compare test
accuracy — K chosen by the audit's ranking, at random, and by training loss."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import Checkpoint
from ..data import ImageDataset
from ..errors import UserError
from ..progress import write
from ..models import resolve_factory
from ..settings import from_dict
from ..train import TrainConfig, evaluate, train


def fix_experiment(ckpt: Checkpoint, train_set: ImageDataset, test_set: ImageDataset, choices: dict[str, np.ndarray],
                   suggested: np.ndarray, device: torch.device, arch: str | None = None) -> dict[str, Any]:
    """For each named choice of K indices: relabel them to ``suggested``, retrain, and measure test accuracy.
    The training settings come from the checkpoint, but its architecture must be registered unless the caller
    names it (``arch``): retraining must not run code a file chose."""
    if not ckpt.meta.train_config:
        raise UserError(f"{ckpt.path} does not record its training settings, so --fix cannot retrain it the same way")
    cfg = from_dict(TrainConfig, ckpt.meta.train_config)
    resolve_factory(cfg.arch, trusted=cfg.arch == arch)
    before = evaluate(ckpt.model, test_set, device)["accuracy"]
    truth = train_set.clean_labels.numpy() if train_set.clean_labels is not None else None
    results: dict[str, Any] = {"k": len(next(iter(choices.values()))), "test_accuracy_before": before,
                               "train_config": dataclasses.asdict(cfg), "methods": {}}
    with tempfile.TemporaryDirectory(prefix="trainfluence-fix-") as tmp:
        for name, idx in choices.items():
            data = train_set.relabeled(idx, suggested[idx])
            metrics = train(cfg, data, test_set, Path(tmp) / name, device, progress=False)
            write(f"fix: {len(idx)} labels chosen by {name} relabelled → test accuracy {metrics['test_accuracy']:.4f}")
            entry: dict[str, Any] = {"test_accuracy_after": metrics["test_accuracy"],
                                     "labels_changed": int((suggested[idx] != train_set.labels.numpy()[idx]).sum())}
            if truth is not None:
                entry["flipped_among_chosen"] = int((train_set.labels.numpy()[idx] != truth[idx]).sum())
                entry["labels_restored"] = int(((suggested[idx] == truth[idx]) & (train_set.labels.numpy()[idx] != truth[idx])).sum())
            results["methods"][name] = entry
    return results
