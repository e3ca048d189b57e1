"""``occlusion`` (Zeiler & Fergus 2014): slide a ``window``×``window`` patch with ``stride`` over the image,
replace it by ``baseline`` (a value in the model's input space, default 0), and attribute to each pixel the
average drop F(x) − F(x with the patch occluded) over the patches covering it (broadcast over channels)."""

from __future__ import annotations

import torch
from torch import nn

from .base import Attribution
from .targets import Target


@torch.no_grad()
def occlusion(model: nn.Module, x: torch.Tensor, target: Target, *, window: int = 6, stride: int = 2,
              baseline: float = 0.0, batch_size: int = 256) -> Attribution:
    b, c, h, w = x.shape
    base_values = target(model, x)
    positions = [(i, j) for i in range(0, max(1, h - window + 1), stride) for j in range(0, max(1, w - window + 1), stride)]
    total = torch.zeros(b, 1, h, w, dtype=x.dtype, device=x.device)
    count = torch.zeros(1, 1, h, w, dtype=x.dtype, device=x.device)
    per = max(1, batch_size // b)
    for start in range(0, len(positions), per):
        chunk = positions[start : start + per]
        occluded = x.repeat(len(chunk), 1, 1, 1)
        for n, (i, j) in enumerate(chunk):
            occluded[n * b : (n + 1) * b, :, i : i + window, j : j + window] = baseline
        idx = torch.arange(b).repeat(len(chunk))
        drops = (base_values.repeat(len(chunk)) - target.select(idx)(model, occluded)).view(len(chunk), b)
        for n, (i, j) in enumerate(chunk):
            total[:, 0, i : i + window, j : j + window] += drops[n].view(b, 1, 1)
            count[:, :, i : i + window, j : j + window] += 1
    attr = (total / count.clamp(min=1)).expand(b, c, h, w).contiguous()
    return Attribution(attr, {"target_values": base_values})
