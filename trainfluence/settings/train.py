"""Training settings (``trainfluence train``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from . import NONNEG, NONNEG_INT, POSITIVE, POSITIVE_INT, Range, option

#: registered architectures (built in :mod:`trainfluence.models`); anything else must be given as module:callable
ARCHITECTURES = ("cnn", "logreg", "mlp", "resnet18")


def check_arch(arch: str) -> None:
    if arch not in ARCHITECTURES and ":" not in arch:
        raise UserError(f"unknown architecture {arch!r}: use one of {', '.join(ARCHITECTURES)} or module:callable")


@dataclass
class TrainConfig:
    arch: str = option("cnn", f"{' | '.join(ARCHITECTURES)} (registered) | module:callable (your own factory, "
                       "called as f(num_classes=K, in_channels=C, image_size=S))")
    epochs: int = option(6, "epochs (a checkpoint after each)", POSITIVE_INT)
    batch_size: int = option(32, "examples per step", POSITIVE_INT)
    optimizer: str = option("adam", "adam | sgd", choices=("adam", "sgd"))
    lr: float = option(3e-3, "peak learning rate (after warm-up)", POSITIVE)
    momentum: float = option(0.9, "sgd momentum", Range(low=0, high=1, high_open=True))
    weight_decay: float = option(5e-4, "L2 coefficient wd of the objective (1/n)Σℓ + (wd/2)|θ|²", NONNEG)
    schedule: str = option("cosine", "learning-rate schedule per step: cosine (with warm-up) | constant",
                           choices=("cosine", "constant"))
    seed: int = option(0, "initialisation and batch-order seed", NONNEG_INT)

    def check(self) -> None:
        check_arch(self.arch)
