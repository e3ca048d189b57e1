"""Quantities of interest: what a saliency map explains.  Each target maps (model, inputs) to one number per
example, ``[B]``; gradients of that number with respect to the inputs are the saliency.

* :class:`ClassTarget` — the logit (or score) of a class, one class for all or one per example.
* :class:`ContrastTarget` — logit c1 minus logit c2 ("why c1 rather than c2").
* :class:`MaskedTarget` — the sum of the logits of the given classes only.
* :class:`NeuronTarget` — a hidden unit: channel ``c`` of a named layer (mean over positions), or one position.

Logits, not softmax probabilities, by default: a probability lets one class overshadow the others.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from ..errors import UserError


def named_module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        convs = [n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
        raise UserError(f"no layer named {name!r}: layers with weights are {', '.join(convs[:12])}")
    return modules[name]


def resolve_layer(model: nn.Module, layer: str | nn.Module) -> str:
    """A layer given as a dotted name or as the module object itself → its dotted name in ``model``."""
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return name
        raise UserError(f"layer {type(layer).__name__} is not a module of this model: pass one of its modules or its name")
    named_module(model, layer)
    return layer


@contextlib.contextmanager
def capture(model: nn.Module, layer: str) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output of ``layer`` as it leaves the layer (``store["out"]``), for every consumer of a layer's
    activations (Grad-CAM, internal influence, neuron targets).

    The hook keeps the layer's own output tensor and hands the rest of the network a copy, so what runs after the
    layer — ``ReLU(inplace=True)``, ``x.relu_()``, ``x += y`` — changes the copy, never the recorded tensor, and
    gradients with respect to the recorded tensor are gradients with respect to the layer's output (what Captum
    does).  A layer that runs more than once in one forward pass (a reused module) is refused: which of its
    outputs is meant would be ambiguous.  The hooks are removed on exit, also after an exception."""
    store: dict[str, torch.Tensor] = {}
    calls = [0]

    def start(_module, _inputs):
        calls[0] = 0

    def hook(_module, _inputs, output):
        if not isinstance(output, torch.Tensor):
            raise UserError(f"layer {layer!r} returns {type(output).__name__}, not a tensor: name a layer with one output")
        calls[0] += 1
        if calls[0] > 1:
            raise UserError(f"layer {layer!r} runs more than once in one forward pass (a reused module): name a layer "
                            "that runs once, e.g. the convolution before a shared activation")
        store["out"] = output
        return output.clone()

    handles = [model.register_forward_pre_hook(start), named_module(model, layer).register_forward_hook(hook)]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


class Target:
    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def select(self, index: torch.Tensor) -> "Target":
        """The same target for a sub-batch (per-example class targets are sliced)."""
        return self

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class ClassTarget(Target):
    classes: int | torch.Tensor  # one class, or one per example [B]

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        c = torch.as_tensor(self.classes, device=logits.device).long()
        if c.dim() == 0:
            return logits[:, c]
        return logits.gather(1, c.view(-1, 1)).squeeze(1)

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.outputs(model(x))

    def select(self, index: torch.Tensor) -> "ClassTarget":
        c = torch.as_tensor(self.classes)
        return self if c.dim() == 0 else ClassTarget(c[index.to(c.device)])


@dataclass
class ContrastTarget(Target):
    c1: int
    c2: int

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, self.c1] - logits[:, self.c2]

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.outputs(model(x))


@dataclass
class MaskedTarget(Target):
    classes: Sequence[int]

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, list(self.classes)].sum(1)

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.outputs(model(x))


@dataclass
class NeuronTarget(Target):
    layer: str
    channel: int
    position: tuple[int, ...] | None = None  # e.g. (row, col) in a convolutional map; None: mean over positions

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with capture(model, self.layer) as store:
            model(x)
        act = store["out"]
        if not 0 <= self.channel < act.shape[1]:
            raise UserError(f"layer {self.layer!r} has {act.shape[1]} channels; channel {self.channel} does not exist")
        unit = act[:, self.channel]
        if self.position is not None:
            return unit[(slice(None), *self.position)]
        return unit.reshape(len(x), -1).mean(1)


def make_target(target: object, num_classes: int | None = None) -> Target:
    """A :class:`Target` from an int, a per-example tensor of classes, or a Target."""
    if isinstance(target, Target):
        return target
    if isinstance(target, (int, torch.Tensor)):
        return ClassTarget(target)
    raise UserError(f"cannot use {target!r} as a saliency target")


def class_index(token: str, classes: Sequence[str], flag: str = "class") -> int:
    """One class, by name or by index; anything else is an error naming ``flag``."""
    if token in classes:
        return list(classes).index(token)
    try:
        value = int(token)
    except ValueError:
        raise UserError(f"{flag}: unknown class {token!r}: use an index 0..{len(classes) - 1} or one of "
                        f"{', '.join(classes)}") from None
    if not 0 <= value < len(classes):
        raise UserError(f"{flag}: class {value} out of range 0..{len(classes) - 1}")
    return value


def parse_target(text: str, classes: Sequence[str]) -> Target | str:
    """CLI spellings: ``pred`` | ``label`` | ``C`` | ``C1-C2`` (contrast) | ``classes:C,C`` | ``neuron:LAYER:CH[:Y:X]``.
    Classes by index or by name.  Returns ``"pred"``/``"label"`` for the per-example choices."""

    def cls(token: str) -> int:
        return class_index(token, classes, "--target")

    if text in ("pred", "label"):
        return text
    if text.startswith("neuron:"):
        parts = text.split(":")[1:]
        if len(parts) not in (2, 4):
            raise UserError("neuron targets look like neuron:LAYER:CHANNEL or neuron:LAYER:CHANNEL:ROW:COL")
        try:
            numbers = [int(p) for p in parts[1:]]
        except ValueError:
            raise UserError(f"neuron target {text!r}: channel, row and col must be integers") from None
        return NeuronTarget(parts[0], numbers[0], tuple(numbers[1:]) if len(numbers) == 3 else None)
    if text.startswith("classes:"):
        return MaskedTarget([cls(t) for t in text[len("classes:"):].split(",") if t])
    if "-" in text and text not in classes:
        a, _, b = text.partition("-")
        return ContrastTarget(cls(a), cls(b))
    return ClassTarget(cls(text))
