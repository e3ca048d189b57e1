"""``grad_cam`` (Selvaraju et al. 2017): with A the activations of a convolutional layer (auto-detected: the
last ``nn.Conv2d``; or named) and F the target,

    wₖ = mean_{i,j} ∂F/∂A_k,ij,     CAM = ReLU(Σₖ wₖ Aₖ),

bilinearly upsampled to the input size and broadcast over the input channels (so the result is shaped like the
inputs).  The forward hook that records A is removed when the call returns."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .base import Attribution
from .targets import Target, capture


def last_conv(model: nn.Module) -> str:
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UserError("grad_cam needs a convolutional layer: the model has none (name one with layer=...)")
    return convs[-1]


def grad_cam(model: nn.Module, x: torch.Tensor, target: Target, *, layer: str | None = None,
             relu: bool = True) -> Attribution:
    """Grad-CAM at ``layer`` (default: the last convolution), upsampled bilinearly to the input size."""
    layer = layer or last_conv(model)
    with torch.enable_grad(), capture(model, layer) as store:
        values = target(model, x.detach())
        acts = store["out"]
        (grads,) = torch.autograd.grad(values.sum(), acts)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = (weights * acts).sum(1, keepdim=True).detach()
    if relu:
        cam = cam.clamp(min=0)
    up = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return Attribution(up.expand_as(x).contiguous(), {"layer": layer, "cam": cam, "target_values": values.detach()})
