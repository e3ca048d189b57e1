"""``guided_backprop`` (Springenberg et al. 2015): at every ReLU the backward signal passes only where both the
forward input and the incoming gradient are positive.

ReLUs are intercepted wherever they are called — ``nn.ReLU`` modules (in-place or not, reused any number of
times), ``F.relu``/``F.relu_``, ``torch.relu``/``torch.relu_`` and ``Tensor.relu``/``relu_`` — by a
``TorchFunctionMode`` active only during the call; no hook is registered and no module is replaced.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .base import Attribution, input_gradient
from .targets import Target


class _GuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = x.clamp(min=0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (out,) = ctx.saved_tensors
        return grad * (out > 0) * (grad > 0)


_OUT_OF_PLACE = {F.relu, torch.relu, torch.Tensor.relu}
_IN_PLACE = {F.relu_, torch.relu_, torch.Tensor.relu_}


class GuidedReLUMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _OUT_OF_PLACE or func in _IN_PLACE:
            inplace = func in _IN_PLACE or bool(kwargs.get("inplace", False) or (len(args) > 1 and args[1] is True))
            x = args[0]
            with torch._C.DisableTorchFunction():
                out = _GuidedReLU.apply(x)
                if inplace:  # keep in-place semantics for code that reuses its input tensor
                    return x.copy_(out)
            return out
        return func(*args, **kwargs)


def guided_backprop(model: nn.Module, x: torch.Tensor, target: Target) -> Attribution:
    with GuidedReLUMode():
        grad, values = input_gradient(model, x, target)
    return Attribution(grad, {"target_values": values})
