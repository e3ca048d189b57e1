"""What removing one training image does to a test loss: the Newton step with the image's own curvature taken out.

Influence predicts the change of a test loss ℓ_t when training example zᵢ is removed to first order,

    Δℓ_t ≈ (1/n) s_tᵀ gᵢ,   s_t = A⁻¹∇ℓ_t,  gᵢ = ∇ℓ(zᵢ),  A = C + (wd + λ)I  (C the curvature over all n examples).

Removing zᵢ also removes its share of the curvature: the objective without it has curvature A − Gᵢ/n, where
Gᵢ = JᵢᵀH_f,iJᵢ = UᵢUᵢᵀ is the example's Gauss–Newton matrix (Uᵢ = JᵢᵀLᵢ, Lᵢ the K − 1 factors of the output
Hessian, :meth:`~trainfluence.objective.Objective.output_hessian_factors`).  One Newton step from θ̂ on that
objective moves the parameters by Δθ = (A − UᵢUᵢᵀ/n)⁻¹ gᵢ/n, and by Sherman–Morrison–Woodbury

    Δℓ_t ≈ ∇ℓ_tᵀΔθ = (1/n) [ s_tᵀgᵢ + (Uᵢᵀs_t)ᵀ (nI − Mᵢ)⁻¹ Uᵢᵀ A⁻¹gᵢ ],   Mᵢ = UᵢᵀA⁻¹Uᵢ  ((K − 1) × (K − 1)).

Mᵢ/n is the example's leverage: how much of the curvature in its own directions it supplies itself.  With the
Gauss–Newton curvature and zᵢ among the examples C is estimated from, A − UᵢUᵢᵀ/n ⪰ (wd + λ)I, so every
eigenvalue of Mᵢ/n is below 1 and the step exists.  A memorised image (leverage near 1) moves the model far more
than the first-order term says; for an image the model barely depends on the two agree.  The cost is K solves
per image (A⁻¹ of Uᵢ's K − 1 columns and of gᵢ), so it is computed for the images a user is shown, not for all n
(by ``explain`` with the exact solver; with an iterative one those are K iterative solves per image).

It needs A itself solved: ``exact``, ``cg`` or ``lissa`` (:data:`NEWTON_SOLVERS`).  A Kronecker-factored or
low-rank approximation does not bound an image's own curvature: on the shapes CNN (400 images, EK-FAC, damping
auto) it gave leverages of 31–144, where the true ones are below 1, so those solvers are refused here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .checks import FIX_SOLVE, require_finite
from .errors import UserError
from .gradients import output_factor_gradients


NEWTON_SOLVERS = ("exact", "cg", "lissa")  # solvers of A itself (module docstring)
DIRECT_SOLVERS = ("exact",)  # where K solves per image cost no more than a product with the stored eigenpairs


def newton_unsupported(solver: str) -> str:
    """Why the Newton step is not computed with ``solver`` ('' when it is)."""
    if solver in NEWTON_SOLVERS:
        return ""
    return (f"the removal's Newton step needs the curvature solved exactly (--solver {', '.join(NEWTON_SOLVERS)}); "
            f"{solver} approximates it and does not bound an image's own curvature, so only the first-order change is given")


def newton_removal(engine: Any, test: Any, train_indices: Any, *, s_test: torch.Tensor | None = None,
                   chunk: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Predicted change of each test loss when each given training example is removed, one Newton step (module
    docstring): ``(change [n_test, m], leverage [m])``, leverage the largest eigenvalue of Mᵢ/n.  ``engine``: an
    :class:`~trainfluence.influence.InfluenceEngine`; ``s_test`` (its rows for ``test``) when already solved."""
    reason = newton_unsupported(engine.solver.name)
    if reason:
        raise UserError(reason)
    fm, obj, n = engine.fm, engine.objective, engine.n
    s = (engine.s_test(test) if s_test is None else s_test).to(engine.device, fm.dtype)
    rows = np.atleast_1d(np.asarray(train_indices))
    change = np.empty((len(s), len(rows)))
    leverage = np.empty(len(rows))
    for start in range(0, len(rows), chunk):
        sel = rows[start : start + chunk]
        x, y = engine.source.tensors(sel, engine.device)
        U = output_factor_gradients(fm, obj, x).to(fm.dtype)  # [m, K − 1, p]
        g = engine.gradients((x, y)).to(fm.dtype)  # [m, p]
        m, k1 = U.shape[:2]
        solved = engine.inverse_hvp(torch.cat([U.reshape(m * k1, -1), g])).to(fm.dtype)
        AU, Ag = solved[: m * k1].reshape(m, k1, -1), solved[m * k1 :]
        M = torch.einsum("icp,idp->icd", U, AU)
        M = 0.5 * (M + M.transpose(1, 2))
        b = torch.einsum("icp,ip->ic", U, Ag)  # Uᵢᵀ A⁻¹ gᵢ
        lev = torch.linalg.eigvalsh(M).amax(1) / n
        system = n * torch.eye(k1, dtype=M.dtype, device=M.device) - M
        w = torch.linalg.solve(system, b.unsqueeze(-1)).squeeze(-1)  # (nI − Mᵢ)⁻¹ Uᵢᵀ A⁻¹gᵢ
        u = torch.einsum("icp,tp->tic", U, s)  # Uᵢᵀ s_t
        delta = (s @ g.T + torch.einsum("tic,ic->ti", u, w)) / n
        delta[:, lev >= 1] = float("nan")  # no step: only when the solve is inexact or the curvature sampled
        change[:, start : start + len(sel)] = delta.double().cpu().numpy()
        leverage[start : start + len(sel)] = lev.double().cpu().numpy()
    return change, require_finite(leverage, "leverage", FIX_SOLVE)
