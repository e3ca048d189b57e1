"""Training: Adam (default) or SGD with momentum, L2 weight decay, a checkpoint per epoch, accuracy as JSON.

Both optimisers' ``weight_decay`` adds ``wd·θ`` to every gradient (coupled L2, not AdamW), i.e. they minimise
``(1/n) Σ ℓ(zᵢ, θ) + (wd/2)‖θ‖²`` — exactly the training objective the influence engine assumes, with the same
``wd`` read back from the checkpoint.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointMeta, save_checkpoint
from .data import ImageDataset
from .errors import UserError
from .progress import bar, write
from .models import build_model, count_parameters, resolve_factory
from .settings import to_dict, write_json


@dataclass
class TrainConfig:
    arch: str = "cnn"  # cnn | logreg | mlp | resnet18 | module:callable
    epochs: int = 6
    batch_size: int = 32
    optimizer: str = "adam"  # adam | sgd
    lr: float = 3e-3  # peak learning rate (after warm-up)
    momentum: float = 0.9  # sgd only
    weight_decay: float = 5e-4  # L2 coefficient wd of the objective (1/n)Σℓ + (wd/2)‖θ‖²
    schedule: str = "cosine"  # cosine | constant (per step; the checkpoint records the epoch's mean lr)
    seed: int = 0

    def validate(self) -> None:
        if self.epochs < 1:
            raise UserError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        resolve_factory(self.arch)
        if self.optimizer not in ("adam", "sgd"):
            raise UserError(f"unknown --optimizer {self.optimizer!r}: use adam or sgd")
        if self.schedule not in ("cosine", "constant"):
            raise UserError(f"unknown --schedule {self.schedule!r}: use cosine or constant")


@torch.no_grad()
def evaluate(model: nn.Module, dataset: ImageDataset, device: torch.device | str = "cpu", batch_size: int = 512) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` (in eval mode) on ``dataset``'s labels."""
    was_training = model.training
    model.eval()
    correct, total_loss = 0, 0.0
    for start in range(0, len(dataset), batch_size):
        x, y = dataset.tensors(slice(start, start + batch_size), device)
        logits = model(x)
        correct += int((logits.argmax(1) == y).sum())
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
    model.train(was_training)
    n = max(len(dataset), 1)
    return {"accuracy": correct / n, "loss": total_loss / n}


def _lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    if cfg.schedule == "constant":
        return cfg.lr
    warmup = max(1, total // 20)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(
    cfg: TrainConfig,
    train_set: ImageDataset,
    test_set: ImageDataset | None,
    out_dir: str | Path,
    device: torch.device | str = "cpu",
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``cfg.arch`` on ``train_set``; write ``epoch-E.pt`` per epoch, ``final.pt``, ``metrics.json``."""
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    c, s, _ = train_set.image_shape
    model = build_model(cfg.arch, train_set.num_classes, c, s).to(device)
    if cfg.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    x_all, y_all = train_set.tensors(device=device)
    n = len(train_set)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, Any]] = []
    started = time.perf_counter()
    if train_set.noise is not None:
        write_json(out / "noise.json", train_set.noise)
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = torch.randperm(n, generator=gen).to(device)
        lrs = []
        pbar = bar(range(steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", disable=not progress)
        for b in pbar:
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            lr = _lr_at(cfg, step, total)
            for group in opt.param_groups:
                group["lr"] = lr
            lrs.append(lr)
            loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
            if not torch.isfinite(loss):
                raise UserError(f"training diverged at epoch {epoch} (loss {float(loss)}): lower --lr (now {cfg.lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            pbar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        train_metrics = evaluate(model, train_set, device)
        test_metrics = evaluate(model, test_set, device) if test_set is not None else {}
        record = {
            "epoch": epoch,
            "lr": sum(lrs) / len(lrs),
            "train_accuracy": train_metrics["accuracy"],
            "train_loss": train_metrics["loss"],
            "test_accuracy": test_metrics.get("accuracy"),
            "test_loss": test_metrics.get("loss"),
            "seconds": time.perf_counter() - started,
        }
        history.append(record)
        meta = CheckpointMeta(
            arch=cfg.arch, num_classes=train_set.num_classes, in_channels=c, image_size=s,
            classes=list(train_set.classes), data=to_dict(train_set.config), mean=list(train_set.mean),
            std=list(train_set.std), epoch=epoch,
            optimizer={"name": cfg.optimizer, "lr": record["lr"], "peak_lr": cfg.lr, "momentum": cfg.momentum,
                       "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size, "schedule": cfg.schedule},
            metrics={k: v for k, v in record.items() if k != "epoch"},
            train_config=to_dict(cfg),
        )
        save_checkpoint(out / f"epoch-{epoch}.pt", model, meta)
        if progress:
            test_txt = f", test accuracy {record['test_accuracy']:.4f}" if test_set is not None else ""
            write(f"epoch {epoch}: train accuracy {record['train_accuracy']:.4f}{test_txt}")
    save_checkpoint(out / "final.pt", model, meta)
    result = {
        "train_config": to_dict(cfg),
        "data": to_dict(train_set.config),
        "parameters": count_parameters(model),
        "epochs": history,
        "train_accuracy": history[-1]["train_accuracy"],
        "test_accuracy": history[-1]["test_accuracy"],
        "seconds": time.perf_counter() - started,
        "checkpoints": [f"epoch-{e}.pt" for e in range(1, cfg.epochs + 1)] + ["final.pt"],
    }
    write_json(out / "metrics.json", result)
    return result
