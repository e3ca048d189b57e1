"""torchrun support: under ``torchrun --nproc_per_node=N`` every rank builds its shard of the gradient store.

Backend gloo on CPU, nccl on GPU (each rank on ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int] | None:
    """(rank, world size) when launched by torchrun with more than one process, else None."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return None
    return int(os.environ.get("RANK", "0")), size


def init(device: torch.device) -> tuple[int, int] | None:
    """Join the process group (once) and return (rank, world size); None outside torchrun."""
    w = world()
    if w is None:
        return None
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return w


def local_device(device: torch.device) -> torch.device:
    if device.type == "cuda" and world() is not None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
