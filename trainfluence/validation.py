"""Ground truth for influence: re-fitting the objective with one example removed or re-weighted.

``refit`` minimises the weighted objective

    L_w(θ) = (1/n) Σᵢ wᵢ ℓ(zᵢ, θ) + (wd/2)‖θ‖²

over the selected parameters, warm-started from the checkpoint, by full-batch L-BFGS (for convex models it
reaches the optimum; for others it finds the nearby stationary point).  Removing z is wᵢ = 0 with the 1/n kept,
which is exactly ε = −1/n in Koh & Liang's derivation, so the actual change of the test loss is comparable to
the prediction −I_up,loss(z, z_test)/n without a rescaling of the regulariser.

The baseline of ``leave_one_out`` is the same refit with every weight one, not the checkpoint itself: where the
checkpoint is the optimum (convex models) the two agree, and where it is only near a stationary point (a ReLU
network, whose objective is not smooth) the drift that any further optimisation adds cancels in the difference.

``proximal_response`` is the other ground truth, the one that influence with the Gauss–Newton curvature answers
to first order at any checkpoint, stationary or not: the proximal Bregman response function (PBRF; Bae, Ng, Lo,
Ghassemi & Grosse 2022).  Removing zₘ from a checkpoint θ̂:

    θˢ = argmin_θ  (1/n) Σⱼ D(f(θ, xⱼ), f(θ̂, xⱼ)) − (1/n) ℓ(zₘ, θ) + ((wd + λ)/2) ‖θ − θ̂‖²

with D(f, f̂) = ℓ(f) − ℓ(f̂) − ∇ℓ(f̂)ᵀ(f − f̂) the loss's Bregman divergence in output space (for cross-entropy
KL(softmax f̂ ‖ softmax f), whatever the label) and (wd/2)‖θ − θ̂‖² the weight decay's own.  At θ = θ̂ every term
but the removal has zero value and gradient, so θˢ − θ̂ = (1/n)(G + (wd + λ)I)⁻¹∇ℓ(zₘ, θ̂) + O(1/n²), G the
Gauss–Newton matrix: the prediction −I_up,loss/n with ``curvature="ggn"`` and damping λ.  Leave-one-out retraining
differs from it where the model is not at a convex optimum (the Hessian's negative and third-order parts, the
optimiser's path), which is what separates the two ground truths on a deep net.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from .data.source import as_source
from .objective import FunctionalModel, Objective, Params


def objective_value(fm: FunctionalModel, objective: Objective, params: Params, x: torch.Tensor, y: torch.Tensor,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    losses = objective.loss(objective.outputs(lambda inp: fm(params, inp), x), y.to(x.device))
    w = torch.ones_like(losses) if weights is None else weights.to(losses)
    return (w * losses).sum() / len(losses) + objective.regularizer(params)


def refit(fm: FunctionalModel, objective: Objective, data: Any, *, weights: torch.Tensor | None = None,
          init: Params | None = None, max_iter: int = 500, tolerance: float = 1e-12) -> Params:
    """Minimise L_w by full-batch L-BFGS (strong Wolfe line search) from ``init`` (default: the checkpoint)."""
    x, y = as_source(data).tensors()
    x, y = x.to(fm.device), y.to(fm.device)
    start = init or fm.params
    return _minimise(fm, lambda params: objective_value(fm, objective, params, x, y, weights), start, max_iter, tolerance)


def _minimise(fm: FunctionalModel, value: Callable[[Params], torch.Tensor], start: Params, max_iter: int,
              tolerance: float) -> Params:
    """argmin of ``value`` over the selected parameters by full-batch L-BFGS (strong Wolfe) from ``start``."""
    theta = [start[n].detach().clone().requires_grad_(True) for n in fm.names]
    opt = torch.optim.LBFGS(theta, lr=1, max_iter=max_iter, tolerance_grad=tolerance, tolerance_change=tolerance ** 2,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        v = value(dict(zip(fm.names, theta)))
        v.backward()
        return v

    opt.step(closure)
    return {n: t.detach() for n, t in zip(fm.names, theta)}


def example_losses(fm: FunctionalModel, objective: Objective, params: Params, test: Any) -> np.ndarray:
    x, y = as_source(test).tensors()
    with torch.no_grad():
        out = objective.outputs(lambda inp: fm(params, inp), x.to(fm.device))
        return objective.loss(out, y.to(fm.device)).double().cpu().numpy()


def leave_one_out(fm: FunctionalModel, objective: Objective, train: Any, test: Any, indices: np.ndarray,
                  progress: Callable[[int], None] | None = None, **refit_args: Any) -> np.ndarray:
    """Actual change of each test loss when each training example in ``indices`` is removed: [len(indices), m].

    change = loss(refit with wᵢ = 0) − loss(refit with all w = 1), both refits with ``refit_args``.
    ``progress`` (optional) is called after each refit with the number done.
    """
    source = as_source(train)

    def without(i: int) -> Params:
        w = torch.ones(len(source))
        w[i] = 0.0
        return refit(fm, objective, source, weights=w, **refit_args)

    base = refit(fm, objective, source, **refit_args)
    return _test_changes(fm, objective, test, base, without, indices, progress)


def _test_changes(fm: FunctionalModel, objective: Objective, test: Any, base: Params, fit: Callable[[int], Params],
                  indices: np.ndarray, progress: Callable[[int], None] | None) -> np.ndarray:
    """[len(indices), m]: test losses at ``fit(i)`` minus those at ``base``, for each i; ``progress(done)`` after each."""
    before = example_losses(fm, objective, base, test)
    out = []
    for i in np.asarray(indices).tolist():
        out.append(example_losses(fm, objective, fit(int(i)), test) - before)
        if progress is not None:
            progress(len(out))
    return np.array(out)


def proximal_response(fm: FunctionalModel, objective: Objective, train: Any, test: Any, indices: np.ndarray,
                      damping: float, progress: Callable[[int], None] | None = None, max_iter: int = 100,
                      tolerance: float = 1e-12, fraction: float = 1.0) -> np.ndarray:
    """Change of each test loss under the proximal Bregman response to removing each of ``indices`` (module
    docstring): [len(indices), m].  ``fraction`` < 1 removes that share of the example's weight (ε = −fraction/n):
    the change divided by ``fraction`` tends, as it shrinks, to the derivative that influence predicts.  Each θˢ
    by full-batch L-BFGS (strong Wolfe) from the checkpoint θ̂, which is the response with nothing removed, so no
    baseline refit is needed."""
    x, y = as_source(train).tensors()
    x, y = x.to(fm.device), y.to(fm.device)
    anchor = {n: fm.params[n].detach() for n in fm.names}
    with torch.no_grad():
        f0 = objective.outputs(lambda inp: fm(anchor, inp), x)
    f0.requires_grad_(True)
    loss0 = objective.loss(f0, y)
    (g0,) = torch.autograd.grad(loss0.sum(), f0)  # ∇ℓ(f̂) of each example (the rows are independent)
    f0, loss0 = f0.detach(), loss0.detach()
    proximity = objective.weight_decay + damping

    def response(m: int) -> Params:
        def value(params: Params) -> torch.Tensor:
            f = objective.outputs(lambda inp: fm(params, inp), x)
            loss = objective.loss(f, y)
            bregman = loss - loss0 - (g0 * (f - f0)).sum(-1)
            moved = sum(((params[n] - anchor[n]) ** 2).sum() for n in fm.names)
            return (bregman.sum() - fraction * loss[m]) / len(loss) + 0.5 * proximity * moved

        return _minimise(fm, value, anchor, max_iter, tolerance)

    return _test_changes(fm, objective, test, anchor, response, indices, progress)
