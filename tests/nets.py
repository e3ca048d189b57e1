"""Small models shared by several test files."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ViewNet(nn.Module):
    """LeNet style: ``x.view(len(x), -1)`` after a convolution, which channels-last activations refuse.  For
    ``channels`` × ``size`` × ``size`` inputs (``size`` even)."""

    def __init__(self, channels: int, size: int, classes: int, width: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(channels, width, 3, padding=1)
        self.fc = nn.Linear(width * (size // 2) ** 2, classes)

    def forward(self, x):
        return self.fc(F.max_pool2d(F.relu(self.conv(x)), 2).view(len(x), -1))


def view_net(num_classes: int, in_channels: int, image_size: int) -> ViewNet:
    """:class:`ViewNet` as a ``module:callable`` factory for ``--arch`` (``tests.nets:view_net``)."""
    return ViewNet(in_channels, image_size, num_classes)
