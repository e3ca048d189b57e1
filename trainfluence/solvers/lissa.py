"""``lissa``: the stochastic Neumann recursion of Koh & Liang (Agarwal et al.'s LiSSA), made to converge.

Convention (one, stated once).  With H = C + (wd + λ)I (C the curvature), a preconditioner P ≈ H (EK-FAC by
default; ``none`` gives the classic recursion), a scale s and minibatch estimates H_B:

    x₀ = P⁻¹g;    x_{j+1} = x_j + P⁻¹(g − H_{B_j} x_j) / s;    x → H⁻¹g.

(With P = I and h = s·x this is the classic hⱼ = g + hⱼ₋₁ − H_B hⱼ₋₁/s, estimate h/s.)  It converges when the
eigenvalues of P⁻¹H lie in (0, 2s): ``scale="auto"`` takes ``scale_factor`` × the top eigenvalue of P⁻¹H from a
power iteration on the held examples, and a good P makes them all close to 1, so few steps are needed.

Minibatch noise sets a floor on the error that more steps do not lower (Koh & Liang's default never reached its
tolerance).  Two remedies here: the batch doubles whenever the residual stops falling by 5% between checks, up to
all of the Hessian's examples (then each step is exact and the recursion converges linearly to H⁻¹g); and the stop
is decided by the residual itself, ‖g − H_held x‖ / ‖g‖ ≤ ``tol`` for every test point, measured every
``check_every`` steps on ``check_samples`` held examples (all of them when there are fewer — then it is the exact
residual).  All test points are solved together, one vectorised product per step.  A diverging recursion (a
residual growing 1000-fold, NaN) stops with the scale or damping to try.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from ..hvp import HessianOperator
from ..progress import bar
from ..settings.influence import LissaSettings
from .base import SolveReport, Solver, preconditioner


class LissaSolver(Solver):
    name = "lissa"
    advice = ("raise --lissa-depth, or --lissa-batch-size (the minibatch noise floor), or use --solver cg or exact")

    def __init__(self, settings: LissaSettings | None = None):
        super().__init__(settings or LissaSettings())
        self.scale_used: float | None = None
        self.trace: list[dict] = []

    def inverse_hvp(self, op: HessianOperator, V: torch.Tensor) -> torch.Tensor:
        st = self.settings
        V = V.to(op.theta)
        P = preconditioner(op, st.preconditioner)
        held = op.subset(st.check_samples, st.seed)
        vnorm = V.norm(dim=1).clamp_min(1e-30)

        def residual(X: torch.Tensor) -> torch.Tensor:
            return (V - held.hvp(X)).norm(dim=1) / vnorm

        if st.scale == "auto":
            top = held.top_eigenvalue(iterations=30, tol=1e-2, seed=st.seed, matvec=lambda v: P(held.hvp(v[None]))[0])
            scale = st.scale_factor * max(top, 1e-12)
        else:
            scale = float(st.scale)
        self.scale_used = scale
        n = len(op.indices)
        batch = min(st.batch_size, n)
        rng = np.random.default_rng(st.seed)
        X = P(V)
        rel = residual(X)
        best, start = float(rel.max()), float(rel.max())
        self.trace = [{"step": 0, "batch": batch, "relative_residual": best}]
        step = 0
        pbar = bar(total=st.depth, desc="lissa", unit="step")
        while best > st.tol and step < st.depth:
            step += 1
            if batch >= n:
                HX = op.hvp(X)
            else:
                x, y = op.sample(rng, batch)
                HX = op.batch_hvp(X, x, y)
            X = X + P(V - HX) / scale
            if not bool(torch.isfinite(X).all()):
                raise self._diverged(op, scale, step)
            pbar.update(1)
            if step % st.check_every == 0 or step == st.depth:
                rel = residual(X)
                worst = float(rel.max())
                self.trace.append({"step": step, "batch": batch, "relative_residual": worst})
                pbar.set_postfix(residual=f"{worst:.2e}", batch=batch, refresh=False)
                if not np.isfinite(worst) or worst > 1e3 * max(start, 1.0):
                    raise self._diverged(op, scale, step)
                if worst > 0.95 * best and batch < n:
                    batch = min(2 * batch, n)  # stalled at the minibatch noise floor: average over more examples
                best = min(best, worst)
        pbar.close()
        final = float(residual(X).max()) if step % st.check_every else best
        self.report = SolveReport(self.name, final <= st.tol, step, "relative residual", final, st.tol,
                                  {"scale": scale, "preconditioner": st.preconditioner, "final_batch": batch,
                                   "held_examples": len(held.indices), "trace": self.trace})
        return X

    def _diverged(self, op: HessianOperator, scale: float, step: int) -> UserError:
        """Why it diverged, measured: the damped curvature's lowest eigenvalue (power iteration on top·I − H)."""
        top = op.top_eigenvalue(seed=self.settings.seed)
        lowest = top - op.top_eigenvalue(seed=self.settings.seed + 1, matvec=lambda v: top * v - op.hvp(v[None])[0])
        if lowest <= 0:
            need = op.damping - lowest
            advice = (f"damping above {need:.3g} (the damped curvature has eigenvalue {lowest:.3g}; try --damping "
                      f"{1.5 * need:.3g}" + (", or --curvature ggn, which is never negative)" if op.curvature == "hessian" else ")"))
        else:
            advice = f"a larger --lissa-scale (now {scale:.4g}; try {4 * scale:.4g})"
        return UserError(f"LiSSA diverged at step {step}: use {advice}")
