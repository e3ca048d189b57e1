"""``gradient``: ∂F/∂x (signed, or its absolute value with ``absolute=True``); ``grad_x_input``: x ⊙ ∂F/∂x."""

from __future__ import annotations

import torch
from torch import nn

from .base import Attribution, input_gradient
from .targets import Target


def gradient(model: nn.Module, x: torch.Tensor, target: Target, *, absolute: bool = False) -> Attribution:
    grad, values = input_gradient(model, x, target)
    return Attribution(grad.abs() if absolute else grad, {"target_values": values})


def grad_x_input(model: nn.Module, x: torch.Tensor, target: Target) -> Attribution:
    grad, values = input_gradient(model, x, target)
    return Attribution(grad * x, {"target_values": values})
