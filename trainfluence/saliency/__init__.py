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
from .targets import ClassTarget, ContrastTarget, MaskedTarget, NeuronTarget, Target, make_target, resolve_layer


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
        tunnel = {k: settings.pop(k) for k in ("samples", "noise", "sigma", "seed") if k in settings}
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


#: Captum's keyword → ours (``stdevs`` is Captum's absolute noise σ; ours also takes it relative, ``noise``)
CAPTUM_SPELLINGS = {"baselines": "baseline", "n_steps": "steps", "nt_samples": "samples", "stdevs": "sigma",
                    "sliding_window_shapes": "window", "strides": "stride", "relu_attributions": "relu",
                    "abs": "absolute"}
_TUNNEL = {"base", "samples", "noise", "sigma", "seed"}


def _parameters(fn: Callable[..., Attribution]) -> set[str]:
    return {n for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}


def accepted_settings(method: str, base: str = "gradient") -> set[str]:
    """The keyword settings ``method`` takes (a noise tunnel: its own and those of the method it wraps)."""
    if method in ("smoothgrad", "vargrad"):
        return _TUNNEL | _parameters(_method(base))
    return _parameters(_method(method))


def _square(value: Any, x: torch.Tensor, key: str) -> int:
    """Captum's (C, h, w) window or stride → our square size, when it spans all channels and h = w."""
    dims = [int(v) for v in (value if isinstance(value, (tuple, list)) else [value])]
    if len(dims) == 3 and key == "sliding_window_shapes" and dims[0] != x.shape[1]:
        raise UserError(f"{key}={tuple(dims)}: occlusion windows here span all {x.shape[1]} channels")
    if len(dims) not in (1, 3) or dims[-1] != dims[-2 if len(dims) == 3 else -1]:
        raise UserError(f"{key}={value!r}: give a square window, e.g. ({x.shape[1]}, 6, 6) or 6")
    return dims[-1]


def translate_settings(method: str, model: nn.Module, x: torch.Tensor, settings: dict[str, Any]) -> dict[str, Any]:
    """Settings in our spelling (Captum's accepted too), ``layer`` as a name; an unknown keyword is an error
    naming the accepted ones."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        name = CAPTUM_SPELLINGS.get(key, key)
        if name in out:
            raise UserError(f"{key} and {name} mean the same setting: give one")
        if name in ("window", "stride") and key in ("sliding_window_shapes", "strides"):
            value = _square(value, x, key)
        if name == "layer" and value is not None:
            value = resolve_layer(model, value)
        out[name] = value
    accepted = accepted_settings(method, out.get("base", "gradient"))
    unknown = sorted(set(out) - accepted)
    if unknown:
        captum = sorted(k for k, v in CAPTUM_SPELLINGS.items() if v in accepted)
        raise UserError(f"{method} has no setting {unknown[0]!r}: it accepts {', '.join(sorted(accepted))}"
                        + (f" (or Captum's {', '.join(captum)})" if captum else ""))
    return out


def attribute_full(model: nn.Module, inputs: torch.Tensor, method: str = "integrated_gradients", target: Any = None,
                   **settings: Any) -> Attribution:
    """Like :func:`attribute`, returning the :class:`Attribution` with the method's extra information."""
    fn = _method(method)
    settings = translate_settings(method, model, inputs, settings)
    if target is None:
        with torch.no_grad(), evaluating(model):
            target = model(inputs).argmax(1)
    target = make_target(target)
    with evaluating(model):
        return fn(model, inputs, target, **settings)


def attribute(model: nn.Module, inputs: torch.Tensor, method: str = "integrated_gradients", target: Any = None,
              *, return_delta: bool = False, return_convergence_delta: bool = False,
              **settings: Any) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attribution shaped like ``inputs`` (target default: the predicted class), called the way Captum's
    ``attribute`` is: ``target=``, ``baselines=``, ``n_steps=``, ``layer=`` (a module or its dotted name),
    ``sliding_window_shapes=`` … are accepted beside our own names.  ``return_delta`` (alias
    ``return_convergence_delta``; integrated gradients) also returns Σ attr − (F(x) − F(x′)) per example."""
    result = attribute_full(model, inputs, method, target, **settings)
    if return_delta or return_convergence_delta:
        if "delta" not in result.info:
            raise UserError(f"{method} has no completeness delta (only integrated_gradients does)")
        return result.attr, result.info["delta"]
    return result.attr


__all__ = ["METHODS", "attribute", "attribute_full", "Attribution", "ClassTarget", "ContrastTarget", "MaskedTarget",
           "NeuronTarget", "Target"]
