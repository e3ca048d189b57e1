"""Batched forward passes without gradients: the one way the engine predicts on many images (accuracy after each
epoch, the audit's probabilities and TracIn's checkpoints, the demo's test predictions, the saliency evaluation's
curves, the internal-influence essence check).

The user's model runs unchanged in function, channels-last on the CPU when it has convolutions
(:mod:`trainfluence.layout`: ``torch.func.functional_call`` with channels-last copies of its 4-D parameters — the
model itself is not converted), in the default layout when its code needs it.  Batches: at most
:data:`CPU_BATCH` examples on the CPU, where larger ones run slower (the default CNN over 6,000 random
3 × 32 × 32 inputs, 2 cores, channels-last: 1.0–1.2 s in batches of 32–128, 2.1 s of 256, 2.5–2.7 s of
512–1,024; the default layout 2.9 s at 64, 4.7 s at 512), :data:`GPU_BATCH` on a GPU.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .data import ImageDataset
from .layout import channels_last_copies, model_wants_channels_last

CPU_BATCH = 128
GPU_BATCH = 1024


def _batch_size(device: torch.device | str) -> int:
    return CPU_BATCH if torch.device(device).type == "cpu" else GPU_BATCH


class Predictor:
    """``Predictor(model)(x)``: the model's outputs for the inputs x, without gradients, in batches and in the
    layout that are fast on x's device; remembers a layout the model's code refused.  The model's mode and hooks
    are its own (set ``eval()`` before)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.layout = channels_last_copies(dict(model.named_parameters()), model_wants_channels_last(model))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        step = _batch_size(x.device)
        return torch.cat([self._batch(x[i : i + step]) for i in range(0, len(x), step)])

    def over(self, data: ImageDataset, device: torch.device | str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(outputs, labels) batch by batch over ``data``, each batch loaded onto ``device`` only when run."""
        step = _batch_size(device)
        for start in range(0, len(data), step):
            x, y = data.tensors(slice(start, start + step), device)
            yield self(x), y

    @torch.no_grad()
    def _batch(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout:
            try:
                args = (x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x,)
                return torch.func.functional_call(self.model, self.layout, args)
            except RuntimeError:  # the model's code needs the default layout (e.g. a view after a convolution)
                self.layout = {}
        return self.model(x)


__all__ = ["CPU_BATCH", "GPU_BATCH", "Predictor"]
