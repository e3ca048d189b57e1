"""``exact``: the dense H and its eigendecomposition — the reference, for models whose H fits in memory."""

from __future__ import annotations

import os

import torch

from ..errors import UserError
from ..gradients import output_factor_gradients
from ..hvp import HessianOperator
from ..linalg import symmetric_eigh
from ..settings.influence import ExactSettings
from .base import EigenSolver

BYTES_PER_ENTRY = 24  # float64 H, its eigenvectors and LAPACK's workspace


def available_memory() -> int:
    """Bytes of memory available now (Linux: MemAvailable; elsewhere the free physical pages)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class ExactSolver(EigenSolver):
    """H⁻¹V = Q Λ⁻¹ Qᵀ V from an exact eigendecomposition of H (:func:`~trainfluence.linalg.symmetric_eigh`),
    reused across calls, in whichever space is smaller:

    * parameter space: the dense p × p H from p curvature-vector products (about 24·p² bytes in float64: H, its
      eigenvectors and LAPACK's workspace);
    * the data's span, with the Gauss–Newton curvature when N(K − 1) < p (N the Hessian's examples, K the outputs):
      H = V Vᵀ + (wd + λ)I with V [p, N(K − 1)] the examples' output-factor gradients divided by √N
      (:func:`~trainfluence.gradients.output_factor_gradients`), so the eigenpairs are those of the small Gram
      matrix VᵀV lifted by V, plus wd + λ on the rest of the space (exact: no direction outside the span carries
      curvature).  About 16·p·N(K − 1) bytes: a few hundred images on a 50k-parameter CNN.

    Refused only when neither fits ``max_memory_gb`` (default 80% of the memory available now).  H must be positive
    definite — with the Hessian of a non-convex model raise the damping until it is."""

    name = "exact"

    def __init__(self, settings: ExactSettings | None = None):
        super().__init__(settings or ExactSettings())

    def compute_eigenpairs(self, op: HessianOperator) -> tuple[torch.Tensor, torch.Tensor]:
        limit = self.settings.max_memory_gb * 2**30 if self.settings.max_memory_gb else 0.8 * available_memory()
        dense = BYTES_PER_ENTRY * op.dim**2
        span_dim = span_rank(op)
        span = BYTES_PER_SPAN_ENTRY * op.dim * span_dim if span_dim is not None else None
        self.complement = None
        if span is not None and span < dense:
            if span > limit:
                raise UserError(
                    f"the exact solver needs about {span / 2**30:.1f} GiB for the Gauss–Newton curvature in the span of "
                    f"{len(op.indices):,} examples ({op.dim:,} x {span_dim:,}), above the {limit / 2**30:.1f} GiB it may "
                    f"use: {SMALLER}"
                )
            return self._span_eigenpairs(op)
        if dense > limit:
            raise UserError(
                f"the exact solver needs about {dense / 2**30:.1f} GiB for a dense {op.dim:,}x{op.dim:,} H, above the "
                f"{limit / 2**30:.1f} GiB it may use: {SMALLER}"
            )
        evals, evecs = symmetric_eigh(op.dense())
        if float(evals.min()) <= 0:
            raise UserError(
                f"the damped curvature is not positive definite (smallest eigenvalue {float(evals.min()):.3g}): "
                f"raise --damping above {max(0.0, -float(evals.min()) + op.damping):.3g}"
            )
        return evals.flip(0), evecs.flip(1)

    def _span_eigenpairs(self, op: HessianOperator) -> tuple[torch.Tensor, torch.Tensor]:
        if op.shift <= 0:
            raise UserError(f"the Gauss–Newton curvature of {len(op.indices):,} examples has rank below its {op.dim:,} "
                            "parameters and weight decay + damping is 0, so it is singular: pass --damping above 0")
        V = torch.cat([output_factor_gradients(op.fm, op.objective, x).double().flatten(0, 1)
                       for x, _ in op.batches()]).T / len(op.indices) ** 0.5  # [p, N(K − 1)]
        gram_values, W = symmetric_eigh(V.T @ V)
        keep = gram_values > gram_values.max().clamp_min(0) * 1e-12 * len(gram_values)
        gram_values, W = gram_values[keep], W[:, keep]
        Q = (V @ W) / gram_values.sqrt()  # orthonormal: the left singular vectors of V
        self.complement = op.shift
        return (gram_values + op.shift).flip(0), Q.flip(1)


SMALLER = "use --params last (fewer parameters), --solver cg, lissa or ekfac, or raise --exact-max-memory-gb"
BYTES_PER_SPAN_ENTRY = 16  # float64 V and its lifted eigenvectors


def span_rank(op: HessianOperator) -> int | None:
    """N(K − 1), the rank bound of the Gauss–Newton curvature over the operator's examples, when the curvature is
    the Gauss–Newton matrix; None otherwise."""
    if op.curvature != "ggn":
        return None
    x, _ = op.source.tensors(op.indices[:1])
    with torch.no_grad():
        k = op.objective.outputs(lambda inp: op.fm(op.fm.params, inp.to(op.fm.device)), x).shape[-1]
    return len(op.indices) * max(1, k - 1)
