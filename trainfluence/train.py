"""Training: Adam (default) or SGD with momentum, L2 weight decay, a checkpoint per epoch, accuracy as JSON.

Both optimisers' ``weight_decay`` adds ``wd·θ`` to every gradient (coupled L2, not AdamW), i.e. they minimise
``(1/n) Σ ℓ(zᵢ, θ) + (wd/2)‖θ‖²`` — exactly the training objective the influence engine assumes, with the same
``wd`` read back from the checkpoint.

Every run has an id written into each of its checkpoints, so checkpoint sums (TracIn) never mix runs that wrote
into the same folder.  Each epoch checkpoint also carries the optimiser's state, the batch-order generator and
torch's RNG, so ``resume=True`` continues an interrupted run from its last checkpoint and ends bit for bit where
the uninterrupted run would have.
"""

from __future__ import annotations

import math
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from .data import ImageDataset
from .data.noise import write_noise_record
from .dynamics import MAX_ENTRIES, images_fingerprint, save_record
from .errors import UserError
from .files import write_json
from .layout import train_channels_last
from .models import build_model, count_parameters
from .predict import Predictor
from .progress import bar, write
from .settings import to_dict, validate
from .settings.train import TrainConfig

__all__ = ["TrainConfig", "evaluate", "train", "epoch_checkpoints"]


@torch.no_grad()
def evaluate(model: nn.Module, dataset: ImageDataset, device: torch.device | str = "cpu") -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` (in eval mode) on ``dataset``'s labels."""
    was_training = model.training
    model.eval()
    correct, total_loss = 0, 0.0
    for logits, y in Predictor(model).over(dataset, device):
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


def epoch_checkpoints(folder: Path, run_id: str | None = None) -> list[Path]:
    """``epoch-E.pt`` files in ``folder`` in epoch order (only those of run ``run_id`` when given)."""
    found = []
    for p in folder.glob("epoch-*.pt"):
        tail = p.stem.split("-", 1)[1]
        if tail.isdigit():
            found.append((int(tail), p))
    paths = [p for _, p in sorted(found)]
    if run_id is not None:
        paths = [p for p in paths if load_checkpoint(p).meta.run_id == run_id]
    return paths


def _resume_point(out: Path, cfg: TrainConfig, train_set: ImageDataset, device: torch.device | str):
    """The last epoch checkpoint of the run in ``out``, checked to be the same training."""
    paths = epoch_checkpoints(out)
    if not paths:
        raise UserError(f"--resume: no epoch-E.pt checkpoints in {out} to continue from (drop --resume to start afresh)")
    ckpt = load_checkpoint(paths[-1], device=device, train_state=True)
    if ckpt.train_state is None:
        raise UserError(f"--resume: {paths[-1]} holds no optimiser state to continue from")
    differ = [k for k, v in to_dict(cfg).items() if ckpt.meta.train_config.get(k) != v]
    if differ:
        raise UserError(f"--resume: the run in {out} was trained with other settings ({', '.join(differ)} differ): "
                        "resume with the same flags")
    if ckpt.meta.data_config.identity() != train_set.config.identity():
        raise UserError(f"--resume: the run in {out} was trained on other data: resume with the same data flags")
    return ckpt


def train(cfg: TrainConfig, train_set: ImageDataset, test_set: ImageDataset | None, out_dir: str | Path,
          device: torch.device | str = "cpu", *, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Train ``cfg.arch`` on ``train_set``; write ``epoch-E.pt`` per epoch, ``final.pt``, ``metrics.json``.
    ``resume``: continue the run whose checkpoints are in ``out_dir`` from its last epoch."""
    validate(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = _resume_point(out, cfg, train_set, device) if resume else None
    c, s, _ = train_set.image_shape
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, train_set.num_classes, c, s, trusted=True).to(device)
    if cfg.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, first_epoch, history, run_id = 0, 1, [], uuid.uuid4().hex[:12]
    if start is not None:
        state = start.train_state
        model.load_state_dict(start.model.state_dict())
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step, history, run_id = int(state["step"]), list(state["history"]), start.meta.run_id
        first_epoch = start.meta.epoch + 1
        if progress:
            write(f"resuming run {run_id} after epoch {start.meta.epoch}")
    elif progress:
        others = [p.name for p in epoch_checkpoints(out) if int(p.stem.split("-")[1]) > cfg.epochs]
        if others:
            write(f"note: {out} also holds {', '.join(others)} from another run; they are not part of this one "
                  "(TracIn reads only this run's checkpoints)")
    x_all, y_all = train_set.tensors(device=device)
    channels_last = train_channels_last(model, x_all[:2])  # faster convolutions on the CPU (layout.py); same function
    if channels_last:
        x_all = x_all.contiguous(memory_format=torch.channels_last)
    n = len(train_set)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    started = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
    write_noise_record(out, train_set)
    meta = start.meta if start is not None else None
    keep_dynamics = n * train_set.num_classes <= MAX_ENTRIES
    pixels = images_fingerprint(train_set.images) if keep_dynamics else ""
    if not keep_dynamics and progress:
        write(f"note: {n} examples x {train_set.num_classes} classes is too many to record training dynamics "
              "(the audit's aum, forgetting and avg_loss scores will be unavailable)")
    for epoch in range(first_epoch, cfg.epochs + 1):
        model.train()
        order = torch.randperm(n, generator=gen).to(device)
        lrs = []
        seen = torch.zeros(n, train_set.num_classes, dtype=torch.float16, device=device) if keep_dynamics else None
        pbar = bar(range(steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", disable=not progress)
        for b in pbar:
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            lr = _lr_at(cfg, step, total)
            for group in opt.param_groups:
                group["lr"] = lr
            lrs.append(lr)
            logits = model(x_all[idx])
            if seen is not None:  # the logits the step is taken from: free training dynamics (kept on the device)
                seen[idx] = logits.detach().to(torch.float16)
            loss = F.cross_entropy(logits, y_all[idx])
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
            train_config=to_dict(cfg), run_id=run_id,
            dynamics=save_record(out, epoch, seen.cpu().numpy(), pixels) if seen is not None else {},
        )
        state = {"optimizer": opt.state_dict(), "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                 "step": step, "history": history}
        save_checkpoint(out / f"epoch-{epoch}.pt", model, meta, state)
        if progress:
            test_txt = f", test accuracy {record['test_accuracy']:.4f}" if test_set is not None else ""
            write(f"epoch {epoch}: train accuracy {record['train_accuracy']:.4f}{test_txt}")
    if meta is None:
        raise UserError(f"--resume: the run in {out} is already complete ({cfg.epochs} epochs)")
    save_checkpoint(out / "final.pt", model, meta)
    result = {
        "run_id": run_id,
        "train_config": to_dict(cfg),
        "data": to_dict(train_set.config),
        "parameters": count_parameters(model),
        "epochs": history,
        "train_accuracy": history[-1]["train_accuracy"],
        "test_accuracy": history[-1]["test_accuracy"],
        "seconds": time.perf_counter() - started,
        "channels_last": channels_last,  # the layout the steps ran in (checkpoints are written in the default one)
        "checkpoints": [f"epoch-{e}.pt" for e in range(1, cfg.epochs + 1)] + ["final.pt"],
    }
    write_json(out / "metrics.json", result)
    return result
