"""Batched forward passes without gradients: the one way the engine predicts on many images (accuracy after each
epoch, the audit's probabilities and TracIn's checkpoints, the saliency evaluation's curves).

The user's model runs unchanged in function, channels-last on the CPU when it has convolutions
(:mod:`trainfluence.layout`: ``torch.func.functional_call`` with channels-last copies of its 4-D parameters — the
model itself is not converted), in the default layout when its code needs it.  Batches: at most
:data:`CPU_BATCH` examples on the CPU, where larger ones run slower (the default CNN over 6,000 shapes images,
2 cores, channels-last: 1.0–1.2 s in batches of 32–128, 2.1 s of 256, 2.5–2.7 s of 512–1,024; the default layout
2.9 s at 64, 4.7 s at 512), :data:`GPU_BATCH` on a GPU.
"""

from __future__ import annotations

import torch

from .layout import channels_last_copies, has_convolution

CPU_BATCH = 128
GPU_BATCH = 1024


def batch_size(device: torch.device | str) -> int:
    """Examples per inference batch on ``device``."""
    return CPU_BATCH if torch.device(device).type == "cpu" else GPU_BATCH


class Predictor:
    """``Predictor(model)(x)``: the model's outputs for the batch x, without gradients, in the layout that is fast
    on the model's device; remembers a layout the model's code refused."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        self.layout = channels_last_copies(dict(model.named_parameters()), device, has_convolution(model))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout:
            try:
                args = (x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x,)
                return torch.func.functional_call(self.model, self.layout, args)
            except RuntimeError:  # the model's code needs the default layout (e.g. a view after a convolution)
                self.layout = {}
        return self.model(x)


__all__ = ["CPU_BATCH", "GPU_BATCH", "Predictor", "batch_size"]
