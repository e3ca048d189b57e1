"""Pixel saliency: which pixels of an input drive a class score, a contrast of two classes, or a hidden unit.

    attr = trainfluence.saliency.attribute(model, x, method="integrated_gradients", target=3, steps=50)

``attribute`` returns a tensor shaped like ``x`` (batched).  :data:`METHODS` is the registry; one small module
per method over the shared template in :mod:`.base` (eval mode restored afterwards, gradients with respect to
the inputs only, hooks removed on exit).  Targets: a class index or a per-example tensor of classes, or a
:class:`~.targets.ContrastTarget`, :class:`~.targets.MaskedTarget`, :class:`~.targets.NeuronTarget`.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

from ..errors import UserError
from .base import Attribution, evaluating
from .gradcam import grad_cam
from .gradient import grad_x_input, gradient
from .guided import guided_backprop
from .integrated import integrated_gradients
from .occlusion import occlusion
from .smooth import noise_tunnel
from .targets import ClassTarget, ContrastTarget, MaskedTarget, NeuronTarget, Target, make_target


def internal_influence(model: nn.Module, x: torch.Tensor, target: Target, *, layer: str | None = None, top: int = 5,
                       distribution: torch.Tensor | None = None, how: str = "mean") -> Attribution:
    """Input saliency of the ``top`` units of ``layer`` most influential for the target over ``distribution``
    (default: the batch itself), each weighted by its influence (Leino et al. 2018)."""
    from ..internal import distributional_influence, top_units, unit_saliency, unit_scores
    from .gradcam import last_conv

    layer = layer or last_conv(model)
    doi = x if distribution is None else distribution
    chi = distributional_influence(model, layer, doi, target if distribution is None else _shared(target))
    scores = unit_scores(chi, how)
    units = top_units(scores, top)
    attr = unit_saliency(model, layer, x, units, scores[units].clamp(min=0))
    return Attribution(attr, {"layer": layer, "units": units, "unit_influence": scores[units]})


def _shared(target: Target) -> Target:
    if isinstance(target, ClassTarget) and torch.as_tensor(target.classes).dim() > 0:
        raise UserError("with a separate distribution of interest, give one class (not one per example)")
    return target


def _wrapped(kind: str) -> Callable[..., Attribution]:
    def run(model: nn.Module, x: torch.Tensor, target: Target, *, base: str = "gradient", **settings: Any) -> Attribution:
        if base in ("smoothgrad", "vargrad"):
            raise UserError(f"{kind} wraps another method, not {base}")
        tunnel = {k: settings.pop(k) for k in ("samples", "noise", "seed") if k in settings}
        return noise_tunnel(model, x, target, method=_method(base), kind=kind, **tunnel, **settings)

    run.__doc__ = f"{kind}: noise tunnel around any method (``base``)"
    return run


METHODS: dict[str, Callable[..., Attribution]] = {
    "gradient": gradient,
    "grad_x_input": grad_x_input,
    "guided_backprop": guided_backprop,
    "integrated_gradients": integrated_gradients,
    "smoothgrad": _wrapped("smoothgrad"),
    "vargrad": _wrapped("vargrad"),
    "grad_cam": grad_cam,
    "occlusion": occlusion,
    "internal_influence": internal_influence,
}


def _method(name: str) -> Callable[..., Attribution]:
    if name not in METHODS:
        raise UserError(f"unknown saliency method {name!r}: use one of {', '.join(METHODS)}")
    return METHODS[name]


def attribute_full(model: nn.Module, inputs: torch.Tensor, method: str = "integrated_gradients", target: Any = None,
                   **settings: Any) -> Attribution:
    """Like :func:`attribute`, returning the :class:`Attribution` with the method's extra information."""
    fn = _method(method)
    if target is None:
        with torch.no_grad(), evaluating(model):
            target = model(inputs).argmax(1)
    target = make_target(target)
    accepted = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        unknown = set(settings) - set(accepted)
        if unknown:
            raise UserError(f"{method} has no setting {sorted(unknown)[0]!r}")
    with evaluating(model):
        return fn(model, inputs, target, **settings)


def attribute(model: nn.Module, inputs: torch.Tensor, method: str = "integrated_gradients", target: Any = None,
              *, return_delta: bool = False, **settings: Any) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attribution shaped like ``inputs`` (target default: the predicted class).  ``return_delta`` (integrated
    gradients) also returns the completeness error Σ attr − (F(x) − F(x′)) per example."""
    result = attribute_full(model, inputs, method, target, **settings)
    if return_delta:
        if "delta" not in result.info:
            raise UserError(f"{method} has no completeness delta (only integrated_gradients does)")
        return result.attr, result.info["delta"]
    return result.attr


__all__ = ["METHODS", "attribute", "attribute_full", "Attribution", "ClassTarget", "ContrastTarget", "MaskedTarget",
           "NeuronTarget", "Target"]
