"""Memory layout: when the engine runs a model channels-last — the one place that choice is made.

oneDNN's CPU convolutions run much faster on channels-last (NHWC) tensors than on the default layout, with the same
values to float rounding.  Measured by hand on the default CNN (2 cores): a [64, 24, 28, 28] → 32-channel convolution
5.2 ms against 13.8 ms; a forward pass over 6,000 random 3 × 32 × 32 inputs (batches of 64) 1.2 s against 2.9 s.
The engine never converts the user's model: it runs it through ``torch.func.functional_call`` with channels-last
copies of its 4-D parameters, and a model whose code needs the default layout (a ``view`` after a convolution)
falls back to it.  On a GPU the default layout is kept.
"""

from __future__ import annotations

from typing import Mapping

import torch


def wants_channels_last(device: torch.device, has_conv: bool) -> bool:
    """Whether a model with (``has_conv``) or without convolutions runs channels-last on ``device``."""
    return device.type == "cpu" and has_conv


def model_wants_channels_last(model: torch.nn.Module) -> bool:
    """:func:`wants_channels_last` for a module, on the device of its parameters."""
    first = next(model.parameters(), None)
    return first is not None and wants_channels_last(first.device, has_convolution(model))


def channels_last_copies(params: Mapping[str, torch.Tensor], wanted: bool) -> dict[str, torch.Tensor]:
    """Channels-last copies of the 4-D tensors of ``params`` when ``wanted``; empty (run in the default layout)
    otherwise."""
    if not wanted:
        return {}
    return {n: p.contiguous(memory_format=torch.channels_last) for n, p in params.items() if p.dim() == 4}


def train_channels_last(model: torch.nn.Module, probe: torch.Tensor) -> bool:
    """Convert ``model`` — a training loop's own, never a user's — to channels-last in place when
    :func:`model_wants_channels_last` and its code accepts the layout (one eval-mode forward pass on ``probe``, a
    batch of one or two inputs; the mode is restored); returns whether it did.  The training step then runs
    1.2–1.5× faster on the default CNN (measured by hand, 2 cores, batches of 64, 4,096 random inputs an epoch:
    1 × 28 × 28 2.4–2.8 s against 3.1–4.1 s; 3 × 32 × 32 3.5 s against 4.3–4.5 s)."""
    if not model_wants_channels_last(model):
        return False
    was_training = model.training
    model.to(memory_format=torch.channels_last).eval()
    try:
        with torch.no_grad():
            model(probe.contiguous(memory_format=torch.channels_last))
        return True
    except RuntimeError:  # the model's code needs the default layout (e.g. a view after a convolution)
        model.to(memory_format=torch.contiguous_format)
        return False
    finally:
        model.train(was_training)


def has_convolution(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


__all__ = ["channels_last_copies", "has_convolution", "model_wants_channels_last", "train_channels_last",
           "wants_channels_last"]
