"""The template every saliency method shares: run the model in eval mode without touching it for good, take
gradients of a target with respect to the inputs, and return an attribution shaped like the inputs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from .targets import Target


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration; every module's previous ``training`` flag is restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def input_gradient(model: nn.Module, x: torch.Tensor, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂target/∂x, target values) for a batch; the parameters' ``.grad`` are never touched."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        values = target(model, x)
        (grad,) = torch.autograd.grad(values.sum(), x)
    return grad.detach(), values.detach()


@dataclass
class Attribution:
    """An attribution shaped like the inputs, and what the method reports beside it (e.g. IG's delta)."""

    attr: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)
