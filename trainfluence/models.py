"""Model registry: the default small CNN, logistic regression, an MLP, torchvision's ResNet-18 adapted to small
images — and a user's own factory as ``module:callable``.

Trust boundary: a registered name is all a checkpoint (or any other file) can choose.  ``module:callable`` imports
and runs code, so it is honoured only when the user gives it (``--arch`` on the command line, ``arch=`` or a model
object in the API) — never because a checkpoint's metadata names it.

Every factory is called as ``factory(num_classes=K, in_channels=C, image_size=S)`` (a user's factory may accept
only the keywords it needs) and returns an ``nn.Module`` mapping ``[B, C, S, S]`` to logits ``[B, K]``.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

import torch
from torch import nn

from .errors import UserError
from .settings.train import ARCHITECTURES, check_arch


class SmallCNN(nn.Module):
    """The default: four 3×3 convolutions (24, 32, 48, 64 channels) with ReLU, two 2×2 max-pools, a global
    max-pool and one linear layer — 49,525 parameters for 3-channel input and 5 classes; no BatchNorm.

    The global max-pool makes the class evidence translation invariant (shapes anywhere in the image).
    """

    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 24, 3, padding=1), nn.ReLU(),
            nn.Conv2d(24, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 48, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(48, 64, 3, padding=1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


def small_cnn(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return SmallCNN(num_classes, in_channels)


def logistic_regression(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Multinomial logistic regression on the flattened pixels (convex with L2: the reference model)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_classes))


def mlp(num_classes: int, in_channels: int = 3, image_size: int = 32, hidden: int = 128) -> nn.Module:
    """Two hidden layers of ``hidden`` ReLU units (784-128-128-10 on MNIST: 118,282 parameters)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def resnet18(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """torchvision's ResNet-18 adapted to small images: 3×3 stride-1 stem, no max-pool (BatchNorm, in-place ReLU)."""
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn": small_cnn,
    "logreg": logistic_regression,
    "mlp": mlp,
    "resnet18": resnet18,
}
assert tuple(MODELS) == ARCHITECTURES, "settings.train.ARCHITECTURES names the registry"


def resolve_factory(arch: str, *, trusted: bool) -> Callable[..., nn.Module]:
    """The factory for ``arch``.  ``module:callable`` is imported only when ``trusted`` (the user typed it)."""
    check_arch(arch)
    if arch in MODELS:
        return MODELS[arch]
    if not trusted:
        raise UserError(f"architecture {arch!r} is not a registered one ({', '.join(MODELS)}); a file cannot choose "
                        f"code to run — if you trust it, pass --arch {arch} (API: arch=...)")
    module_name, _, attr = arch.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"cannot load model factory {arch!r}: {exc}; give module:callable importable from here") from exc
    if not callable(factory):
        raise UserError(f"model factory {arch!r} is not callable")
    return factory


def build_model(arch: str, num_classes: int, in_channels: int, image_size: int, *, trusted: bool = False) -> nn.Module:
    """Instantiate ``arch`` for the given data shape (``trusted``: see :func:`resolve_factory`)."""
    factory = resolve_factory(arch, trusted=trusted)
    kwargs = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    try:
        params = inspect.signature(factory).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            kwargs = {k: v for k, v in kwargs.items() if k in params}
    except (TypeError, ValueError):
        pass
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise UserError(f"model factory {arch!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
