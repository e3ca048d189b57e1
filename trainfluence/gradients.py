"""Per-example loss gradients with ``torch.func``: ``vmap`` over ``grad`` of one example's loss.

For a batch of examples zᵢ = (xᵢ, yᵢ) the result is the matrix with rows gᵢ = ∇_θ ℓ(zᵢ, θ̂) over the selected
parameters (the unregularised per-example loss; the weight-decay term belongs to the objective, not to the
examples), together with each example's loss, logits and predicted class.  The model runs in eval mode, so
BatchNorm uses its running statistics and every row equals what a per-example autograd loop gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.func import grad, vjp, vmap

from .objective import FunctionalModel, Objective, Params

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of working memory for one vmap batch


@dataclass
class ExampleGradients:
    grads: Params  # name → [B, *param_shape]
    loss: torch.Tensor  # [B]
    logits: torch.Tensor  # [B, K]

    @property
    def pred(self) -> torch.Tensor:
        return self.logits.argmax(dim=-1)


def per_example_fn(fm: FunctionalModel, objective: Objective) -> Callable[[Params, torch.Tensor, torch.Tensor], tuple]:
    """θ, x[B], y[B] → (per-example gradient dict, (loss[B], logits[B, K]))."""

    def one(params: Params, x: torch.Tensor, y: torch.Tensor):
        out = objective.outputs(lambda inp: fm(params, inp), x.unsqueeze(0))
        loss = objective.loss(out, y.unsqueeze(0)).squeeze(0)
        return loss, (loss.detach(), out.squeeze(0).detach())

    return vmap(grad(one, has_aux=True), in_dims=(None, 0, 0))


def output_factor_gradients(fm: FunctionalModel, objective: Objective, x: torch.Tensor,
                            memory_budget: int = DEFAULT_MEMORY_BUDGET) -> torch.Tensor:
    """[B, K − 1, p]: for each example the rows Jᵢᵀu_c, u_c the factors of its output Hessian
    (:meth:`~trainfluence.objective.Objective.output_hessian_factors`), so that Σ_c (Jᵢᵀu_c)(Jᵢᵀu_c)ᵀ = JᵢᵀH_f,iJᵢ,
    the example's Gauss–Newton matrix.  ``vmap`` over examples of one forward and K − 1 backward passes, in
    memory-bounded slices."""
    theta = fm.flat_params()
    x = x.to(fm.device)
    if x.is_floating_point():
        x = x.to(fm.dtype)
    if not len(x):
        return torch.zeros(0, 0, fm.dim, dtype=fm.dtype, device=fm.device)
    with torch.no_grad():
        factors = objective.output_hessian_factors(objective.outputs(lambda inp: fm(fm.params, inp), x))  # [K−1, B, K]

    def one(xi: torch.Tensor, fi: torch.Tensor) -> torch.Tensor:
        _, pull = vjp(lambda th: objective.outputs(lambda inp: fm(fm.unflatten(th), inp), xi.unsqueeze(0)), theta)
        return vmap(lambda c: pull(c.unsqueeze(0))[0])(fi)

    step = max(1, vmap_batch_size(fm, x[0], memory_budget) // max(1, len(factors)))
    per_example = factors.transpose(0, 1)  # [B, K − 1, K]
    with torch.no_grad():
        return torch.cat([vmap(one)(x[i : i + step], per_example[i : i + step]) for i in range(0, len(x), step)])


def activation_numel(fm: FunctionalModel, example: torch.Tensor, *, downstream_only: bool = False) -> int:
    """Number of activation values one example produces (summed over leaf modules), from one forward pass.

    ``downstream_only``: count only modules registered after the first one owning a selected parameter — an
    estimate of the activations that carry forward-mode tangents in a Hessian-vector product."""
    total = 0

    def hook(_m, _inp, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel()

    leaves = [(name, m) for name, m in fm.module.named_modules() if not list(m.children())]
    if downstream_only:
        owners = {n.rpartition(".")[0] for n in fm.names}
        first = next((i for i, (name, _) in enumerate(leaves) if name in owners), 0)
        leaves = leaves[first:]
    handles = [m.register_forward_hook(hook) for _, m in leaves]
    try:
        with torch.no_grad():
            fm(fm.params, example.unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    return total


# Above this many examples per vmap call CPU throughput drops (cache effects; measured in BENCHMARKS.md);
# GPUs keep gaining up to much larger batches.
MAX_VMAP_BATCH = {"cpu": 64, "cuda": 2048}


MAX_PASS_ROWS = 1024  # rows per step of a pass over per-example gradients when they are small


def rows_within(dim: int, memory_budget: int = DEFAULT_MEMORY_BUDGET, copies: int = 4) -> int:
    """Rows of float32 per-example gradients [m, dim] a pass (self-influence, relabelling) takes per step, so
    that ``copies`` of them — the rows, a cast, a solver's transforms — fit in ``memory_budget`` bytes: at least
    1, at most :data:`MAX_PASS_ROWS` (a resnet18's 11.2M-parameter rows: 6 per step at 1 GiB, not 1,024 = 46 GB)."""
    return max(1, min(MAX_PASS_ROWS, int(memory_budget // (copies * 4 * max(1, dim)))))


def vmap_batch_size(fm: FunctionalModel, example: torch.Tensor, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Examples per vmap call so that gradients (×2 for the copies vmap makes) and activations (×4 for
    forward, backward and saved intermediates) of one call fit in ``memory_budget`` bytes, capped per device."""
    per_example = 4 * (2 * fm.dim + 4 * activation_numel(fm, example))
    cap = MAX_VMAP_BATCH.get(fm.device.type, 1024)
    return max(1, min(cap, int(memory_budget // per_example)))


class GradientComputer:
    """Per-example gradients of ``objective`` for ``fm``'s selected parameters, in memory-bounded vmap batches
    (``batch_size``: examples per vmap call; default: what fits in ``memory_budget`` bytes)."""

    def __init__(self, fm: FunctionalModel, objective: Objective, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 batch_size: int | None = None):
        self.fm, self.objective, self.memory_budget = fm, objective, memory_budget
        self._fn = per_example_fn(fm, objective)
        self._batch: int | None = batch_size

    def batch_size(self, example: torch.Tensor) -> int:
        if self._batch is None:
            self._batch = vmap_batch_size(self.fm, example, self.memory_budget)
        return self._batch

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> ExampleGradients:
        """Gradients for one vmap batch (the caller keeps ``len(x)`` within :meth:`batch_size`)."""
        x, y = x.to(self.fm.device), y.to(self.fm.device)
        grads, (loss, logits) = self._fn(self.fm.params, x, y)
        return ExampleGradients(grads, loss, logits)

    def batches(self, x: torch.Tensor, y: torch.Tensor):
        """Yield :class:`ExampleGradients` for consecutive memory-bounded slices of ``(x, y)``."""
        step = self.batch_size(x[0])
        for start in range(0, len(x), step):
            yield self(x[start : start + step], y[start : start + step])

    def flat(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """All gradients of ``(x, y)`` as one flat matrix [B, p] (for small batches and tests)."""
        return torch.cat([self.fm.flatten(b.grads) for b in self.batches(x, y)])
