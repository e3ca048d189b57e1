"""Curvature-vector products of the training objective with ``torch.func``.

    L(θ) = (1/n) Σᵢ ℓ(zᵢ, θ) + (wd/2)‖θ‖²,    H v = (1/n) Σᵢ Cᵢ v + (wd + λ) v,

with Cᵢ, by ``curvature``:

* ``hessian`` — ∇²ℓ(zᵢ), forward-over-reverse (``jvp`` of ``grad``).  Indefinite for a deep net away from a
  minimum: damping must exceed its most negative eigenvalue.
* ``ggn`` — the Gauss–Newton matrix Jᵢᵀ H_f Jᵢ (J the Jacobian of the outputs, H_f the loss's Hessian in output
  space): one ``jvp`` and one ``vjp`` per vector.  Positive semi-definite, equal to the Hessian for a linear model
  and to the Fisher with the model's own labels for cross-entropy; what K-FAC / EK-FAC approximate.

:meth:`HessianOperator.hvp` averages over the training examples (all of them, or a fixed seeded subset of
``hessian_samples``) in batches weighted by their size; :meth:`HessianOperator.batch_hvp` is the minibatch
estimate H_B v used by LiSSA.  Both take a matrix of right-hand sides ``V [m, p]`` and vectorise over its rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch.func import grad, jvp, vjp, vmap

from .checks import require_finite
from .data.source import ExampleSource
from .fingerprint import fingerprint
from .gradients import activation_numel
from .objective import FunctionalModel, Objective
from .progress import bar

CURVATURES = ("hessian", "ggn")

if TYPE_CHECKING:
    from .kfac import KroneckerCurvature
    from .settings.influence import KroneckerSettings


class HessianOperator:
    def __init__(
        self,
        fm: FunctionalModel,
        objective: Objective,
        source: ExampleSource,
        damping: float,
        *,
        curvature: str = "hessian",
        batch_size: int = 256,
        hessian_samples: int | None = None,
        seed: int = 0,
        rhs_chunk: int | None = None,
        memory_budget: int = 1 << 30,
    ):
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        self.fm, self.objective, self.source, self.curvature = fm, objective, source, curvature
        self.damping, self.batch_size = float(damping), batch_size
        self._rhs_chunk, self.memory_budget = rhs_chunk, memory_budget
        n = len(source)
        if hessian_samples is not None and hessian_samples < n:
            rng = np.random.default_rng(seed)
            self.indices = np.sort(rng.choice(n, size=hessian_samples, replace=False))
        else:
            self.indices = np.arange(n)
        self.theta = fm.flat_params()
        self.dim = fm.dim
        self._grad = grad(self._mean_loss)
        self._batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._kronecker: dict[tuple, "KroneckerCurvature"] = {}
        # (cache directory, what the model and data are) to keep Kronecker fits on disk (:mod:`.store.curvature`)
        self.curvature_cache: tuple[Path, dict[str, Any]] | None = None

    @property
    def rhs_chunk(self) -> int:
        """Right-hand sides per vmapped product: forward-mode tangents of the activations downstream of the
        selected parameters (×3 for the reverse pass), for a batch, within ``memory_budget``; at most 512."""
        if self._rhs_chunk is None:
            x, _ = self.source.tensors(self.indices[:1])
            per_rhs = 4 * 3 * self.batch_size * max(1, activation_numel(self.fm, x[0].to(self.theta.device), downstream_only=True))
            self._rhs_chunk = int(max(1, min(512, self.memory_budget // per_rhs)))
        return self._rhs_chunk

    @property
    def shift(self) -> float:
        """wd + λ: the part of H that is a multiple of the identity."""
        return self.objective.weight_decay + self.damping

    def _mean_loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.objective.outputs(lambda inp: self.fm(self.fm.unflatten(theta), inp), x)
        return self.objective.loss(out, y).mean()

    def _outputs(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.objective.outputs(lambda inp: self.fm(self.fm.unflatten(theta), inp), x)

    def data_hvp(self, V: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(1/|B|) Σ_{i∈B} Cᵢ V for the batch (x, y) — Cᵢ the Hessian of ℓ(zᵢ) or its Gauss–Newton matrix; V [m, p]."""
        x, y = x.to(self.theta.device), y.to(self.theta.device)

        if self.curvature == "hessian":
            def one(v: torch.Tensor) -> torch.Tensor:
                return jvp(lambda th: self._grad(th, x, y), (self.theta,), (v,))[1]
        else:
            outputs, pullback = vjp(lambda th: self._outputs(th, x), self.theta)
            scale = 1.0 / len(y)

            def one(v: torch.Tensor) -> torch.Tensor:
                jv = jvp(lambda th: self._outputs(th, x), (self.theta,), (v,))[1]
                return pullback(self.objective.output_hessian_vp(outputs, jv) * scale)[0]

        V = V.to(self.theta)
        return torch.cat([vmap(one)(V[i : i + self.rhs_chunk]) for i in range(0, len(V), self.rhs_chunk)])

    def batch_hvp(self, V: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Minibatch estimate H_B V = ∇²L_B V + (wd + λ) V."""
        return self.data_hvp(V, x, y) + self.shift * V.to(self.theta)

    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The Hessian's examples as fixed batches (kept in memory: they are re-read by every product)."""
        if self._batches is None:
            idx = self.indices
            self._batches = [self.source.tensors(idx[i : i + self.batch_size]) for i in range(0, len(idx), self.batch_size)]
        return self._batches

    def hvp(self, V: torch.Tensor) -> torch.Tensor:
        """H V over the whole (sub)set: size-weighted average of batch products, plus (wd + λ) V."""
        V = V.to(self.theta)
        total = torch.zeros_like(V)
        n = len(self.indices)
        with torch.no_grad():
            for x, y in self.batches():
                total += self.data_hvp(V, x, y) * (len(y) / n)
        return require_finite(total + self.shift * V, "a Hessian-vector product",
                              "the model or its inputs give NaN/Inf curvature — check the checkpoint, or raise --damping")

    def kronecker(self, *, corrected: bool = True, settings: "KroneckerSettings | None" = None) -> "KroneckerCurvature":
        """The Kronecker-factored (EK-FAC, or K-FAC) Gauss–Newton approximation over this operator's examples (or a
        seeded sample of ``settings.samples`` of them), estimated once per settings and shared by every solver that
        asks; ``settings.batch_size`` examples per batch at most, fewer when ``memory_budget`` holds fewer
        (:meth:`KroneckerCurvature.batch_within`); how each example's output curvature enters: ``settings.labels``
        and ``settings.trace_tol``.  None: :class:`~trainfluence.settings.influence.KroneckerSettings`' defaults."""
        from .kfac import KroneckerCurvature
        from .settings.influence import KroneckerSettings

        st = settings or KroneckerSettings()
        output = st.output_curvature()
        fit = (st.samples, st.batch_size, st.seed, *output.values())
        key, ekfac = (corrected, *fit), (True, *fit)
        if key not in self._kronecker and ekfac in self._kronecker:  # K-FAC after EK-FAC (damping auto): its factors
            self._kronecker[key] = self._kronecker[ekfac].uncorrected()
        if key not in self._kronecker:
            idx = self.indices
            if st.samples is not None and st.samples < len(idx):
                idx = np.sort(np.random.default_rng(st.seed).choice(idx, size=st.samples, replace=False))
            kc = KroneckerCurvature(self.fm, self.objective, corrected=corrected, labels=st.labels, seed=st.seed,
                                    trace_tol=st.trace_tol)
            cache = None
            if self.curvature_cache is not None:
                from .store.curvature import CurvatureCache

                directory, base = self.curvature_cache
                cache = CurvatureCache(directory, {**base, "corrected": corrected, "examples": fingerprint(idx),
                                                   "batch_size": st.batch_size, **output})
            if cache is None or not cache.load(kc):
                kc.fit(self.source, idx, batch_size=st.batch_size, memory_budget=self.memory_budget)
                if cache is not None:
                    cache.save(kc)
            self._kronecker[key] = kc
        return self._kronecker[key]

    def subset(self, size: int, seed: int = 0) -> "HessianOperator":
        """The same operator over a seeded random subset of at most ``size`` of its examples."""
        if size >= len(self.indices):
            return self
        sub = HessianOperator.__new__(HessianOperator)
        sub.__dict__.update(self.__dict__)
        rng = np.random.default_rng(seed)
        sub.indices = np.sort(rng.choice(self.indices, size=size, replace=False))
        sub._batches = None
        sub._kronecker = {}
        return sub

    def sample(self, rng: np.random.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A uniformly random minibatch (without replacement) of the Hessian's examples."""
        pick = rng.choice(len(self.indices), size=min(batch_size, len(self.indices)), replace=False)
        return self.source.tensors(self.indices[np.sort(pick)])

    def dense(self, chunk: int | None = None, progress: bool = True) -> torch.Tensor:
        """The full p×p matrix H, column block by column block (float64)."""
        chunk = chunk or self.rhs_chunk
        eye = torch.eye(self.dim, dtype=self.theta.dtype, device=self.theta.device)
        cols = [self.hvp(eye[i : i + chunk]).double() for i in bar(range(0, self.dim, chunk), desc="dense Hessian",
                                                                    unit="block", disable=not progress)]
        H = torch.cat(cols).T  # rows of the product are H eᵢ = columns of H
        return 0.5 * (H + H.T)

    def extreme_eigenvalues(self, iterations: int = 30, seed: int = 0,
                            matvec: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[float, float]:
        """(smallest, largest) Ritz value of a symmetric operator (default H) after ``iterations`` Lanczos steps with
        full reorthogonalisation.  The largest is accurate early; the smallest is an over-estimate of the true
        smallest eigenvalue (Ritz values lie inside the spectrum)."""
        matvec = matvec or (lambda v: self.hvp(v[None])[0])
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(self.dim, generator=g, dtype=torch.float64)
        Q = [q / q.norm()]
        alphas, betas = [], []
        for k in range(min(iterations, self.dim)):
            w = matvec(Q[-1].to(self.theta)).double().cpu()
            a = float(w @ Q[-1])
            alphas.append(a)
            for basis in Q:  # full reorthogonalisation: a handful of vectors, cheap next to the products
                w -= (w @ basis) * basis
            b = float(w.norm())
            if b < 1e-12 * max(1.0, abs(a)) or k == min(iterations, self.dim) - 1:
                break
            betas.append(b)
            Q.append(w / b)
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
            T += torch.diag(off, 1) + torch.diag(off, -1)
        ritz = torch.linalg.eigvalsh(T)
        return float(ritz[0]), float(ritz[-1])

    def top_eigenvalue(self, iterations: int = 50, tol: float = 1e-3, seed: int = 0,
                       matvec: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
        """Largest-magnitude eigenvalue of H (power iteration), signed by its Rayleigh quotient."""
        matvec = matvec or (lambda v: self.hvp(v[None])[0])
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(self.dim, generator=g).to(self.theta)
        v /= v.norm()
        value = 0.0
        for _ in range(iterations):
            w = matvec(v)
            new = float(v @ w)
            norm = w.norm()
            if norm == 0:
                return 0.0
            v = w / norm
            if abs(new - value) <= tol * abs(new):
                return new
            value = new
        return value
