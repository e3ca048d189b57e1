"""``lissa``: the stochastic inverse-HVP recursion of Koh & Liang (Agarwal et al.'s LiSSA).

Convention (one, stated once).  With H_B the minibatch estimate of H = ∇²L + λI and a scale s:

    h₀ = v;    hⱼ = v + hⱼ₋₁ − H_Bⱼ hⱼ₋₁ / s;    estimate H⁻¹v ≈ h_J / s,

averaged over ``repeats`` independent runs.  Its fixed point satisfies H h = s v, so h/s = H⁻¹ v.  It converges
only when 0 < eig(H/s) < 2 for the batches used: a scale above the top eigenvalue of H is safe (``scale="auto"``
takes ``scale_factor`` × a power-iteration estimate of it on ``scale_samples`` examples); a negative eigenvalue of ∇²L larger in magnitude
than λ makes it diverge.  The error shrinks like (1 − μ_min/s)ʲ, so ``depth`` must be several times s/μ_min.

Stops early when the relative change of the estimate over ``check_every`` steps falls below ``tol``.
Divergence — a non-finite value, or ‖hⱼ‖ > 2(j + 1)‖v‖, which a contraction cannot produce — raises a
:class:`~trainfluence.errors.UserError` naming the scale or damping to try.  ``trace`` keeps, per repeat, the
step, ‖h/s‖ and the relative change at every check.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from ..hvp import HessianOperator
from ..progress import bar
from ..settings.influence import LissaSettings
from .base import SolveReport, Solver


class LissaSolver(Solver):
    name = "lissa"
    advice = "raise --lissa-batch-size or --lissa-repeats (the noise floor is the minibatch variance), or use --solver cg or exact"

    def __init__(self, settings: LissaSettings | None = None):
        super().__init__(settings or LissaSettings())
        self.scale_used: float | None = None
        self.trace: list[dict] = []

    def resolve_scale(self, op: HessianOperator) -> float:
        s = self.settings.scale
        if s == "auto":
            top = op.subset(self.settings.scale_samples, self.settings.seed).top_eigenvalue(tol=1e-3, seed=self.settings.seed)
            return self.settings.scale_factor * max(top, 1e-12)
        return float(s)

    def _diverged(self, op: HessianOperator, scale: float, step: int, norm: float) -> UserError:
        top = op.top_eigenvalue(seed=self.settings.seed)
        # most negative eigenvalue of H: power iteration on (top·I − H) gives top − μ_min
        shifted = op.top_eigenvalue(seed=self.settings.seed + 1,
                                    matvec=lambda v: top * v - op.hvp(v[None])[0])
        lowest = top - shifted
        advice = []
        if scale < top:
            advice.append(f"a scale above the top eigenvalue {top:.4g} (try --lissa-scale {2 * top:.4g})")
        if lowest <= 0:
            advice.append(f"damping above {op.damping - lowest:.3g} (the damped Hessian has eigenvalue {lowest:.3g}; try --damping {1.5 * (op.damping - lowest):.3g})")
        if not advice:
            advice.append(f"a larger scale (try --lissa-scale {4 * scale:.4g}: minibatch Hessians exceed the full one) or a larger --lissa-batch-size")
        return UserError(f"LiSSA diverged at step {step} (norm {norm:.3g}) with scale {scale:.4g} and damping "
                         f"{op.damping:.3g}: use " + " or ".join(advice))

    def inverse_hvp(self, op: HessianOperator, V: torch.Tensor) -> torch.Tensor:
        st = self.settings
        scale = self.resolve_scale(op)
        self.scale_used = scale
        V = V.to(op.theta)
        vnorm = V.norm(dim=1).clamp_min(1e-30)
        total = torch.zeros_like(V)
        self.trace = []
        converged, steps, worst = True, 0, 0.0
        for r in range(st.repeats):
            rng = np.random.default_rng([st.seed, r])
            h = V.clone()
            previous = h / scale
            trace = {"repeat": r, "scale": scale, "steps": [], "norm": [], "relative_change": []}
            with torch.no_grad():
                for j in bar(range(1, st.depth + 1), desc=f"lissa repeat {r + 1}/{st.repeats}", unit="step"):
                    x, y = op.sample(rng, st.batch_size)
                    h = V + h - op.batch_hvp(h, x, y) / scale
                    norms = h.norm(dim=1)
                    if not torch.isfinite(norms).all() or bool((norms > 2 * (j + 1) * vnorm).any()):
                        raise self._diverged(op, scale, j, float(norms.max()))
                    if j % st.check_every == 0 or j == st.depth:
                        estimate = h / scale
                        change = float(((estimate - previous).norm(dim=1) / estimate.norm(dim=1).clamp_min(1e-30)).max())
                        trace["steps"].append(j)
                        trace["norm"].append(float(estimate.norm(dim=1).max()))
                        trace["relative_change"].append(change)
                        previous = estimate
                        if change < st.tol:
                            break
            self.trace.append(trace)
            total += h / scale
            final = trace["relative_change"][-1]
            converged, steps, worst = converged and final < st.tol, max(steps, trace["steps"][-1]), max(worst, final)
        self.report = SolveReport(self.name, converged, steps, "relative change", worst, st.tol,
                                  {"scale": scale, "repeats": st.repeats, "batch_size": st.batch_size})
        return total / st.repeats
