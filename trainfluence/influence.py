"""Koh & Liang influence functions over the gradient store.

Definitions (model in eval mode, selected parameters θ, checkpoint θ̂):

    L(θ) = (1/n) Σᵢ ℓ(zᵢ, θ) + (wd/2)‖θ‖²          H = ∇²L(θ̂) + λI   (λ = damping)
    s_test = H⁻¹ ∇ℓ(z_test)
    I_up,loss(z, z_test) = −∇ℓ(z_test)ᵀ H⁻¹ ∇ℓ(z) = −⟨s_test, ∇ℓ(z)⟩
        positive: upweighting z raises the test loss (harmful); negative: helpful.
        Removing z changes the test loss by about −I_up,loss(z, z_test) / n (first order; removal_effect adds the
        Newton step with z's own curvature taken out, trainfluence.removal).
    I_up,params(z) = −H⁻¹ ∇ℓ(z)                      (dθ̂/dε when z's weight grows by ε)
    I_pert,loss(z, z_test) = −∇ℓ(z_test)ᵀ H⁻¹ ∇ₓ∇_θ ℓ(z) = −∇ₓ ⟨s_test, ∇_θ ℓ(z)⟩, a map over z's pixels:
        moving z's image by δ changes the test loss by about ⟨I_pert,loss, δ⟩ / n.
    self-influence(z) = ∇ℓ(z)ᵀ H⁻¹ ∇ℓ(z)  (≥ 0 when H is positive definite)

With a projected store the scores are −⟨P s_test, P ∇ℓ(z)⟩ ≈ I_up,loss (inner products preserved in expectation).

Return types: scores (one number per pair or example) are numpy arrays; vectors in parameter or input space
(gradients, s_test, I_up,params, I_pert,loss) are torch tensors on the engine's device.

    >>> engine = InfluenceEngine("runs/shapes/final.pt", train_set)      # the defaults of the command line
    >>> scores = engine.influence(test_set)                              # [n_test, n_train], I_up,loss
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import grad, jvp, vmap

from .checkpoint import Checkpoint, load_checkpoint, model_fingerprint
from .checks import FIX_MODEL, FIX_SOLVE, require_finite
from .data.source import ExampleSource, as_source
from .device import resolve_device
from .errors import UserError
from .gradients import GradientComputer, rows_within
from .hvp import HessianOperator
from .objective import FunctionalModel, Objective
from .progress import bar, warn
from .removal import newton_removal
from .search import GradientIndex
from .settings import to_dict, validate
from .settings.influence import (DAMPING_AUTO_FRACTION, EXACT_AUTO_MAX_PARAMS, InfluenceSettings, KroneckerSettings,
                                 SearchSettings, StoreSettings)
from .solvers import SolveReport, make_solver
from .store import BuildReport, GradientStore, build_store
from .store.stest import STestCache

_FIELDS = {f.name: cls for cls in (InfluenceSettings, StoreSettings) for f in dataclasses.fields(cls)}


@dataclass
class InfluenceTopK:
    """Per test point: the k most helpful (most negative I_up,loss first) and most harmful (most positive first)."""

    helpful_index: np.ndarray  # [m, k]
    helpful_score: np.ndarray  # [m, k] I_up,loss, ascending
    harmful_index: np.ndarray  # [m, k]
    harmful_score: np.ndarray  # [m, k] I_up,loss, descending


def resolve_solver(name: str, fm: FunctionalModel) -> str:
    """``auto`` → ``exact`` up to ``EXACT_AUTO_MAX_PARAMS`` parameters (the reference, and the fastest there);
    else ``lissa`` when the selected parameters belong to one Linear or Conv2d layer, else ``ekfac``.

    Why (BENCHMARKS.md, LDS): with one layer, EK-FAC captures most of the curvature (κ(P⁻¹H) ≈ 90 on MNIST logistic
    regression) and the EK-FAC-preconditioned LiSSA reaches its tolerance in tens of steps, matching the exact solve
    (LDS 0.913 = 0.913); across layers the curvature between them, which EK-FAC drops, leaves κ(P⁻¹H) ≈ 1,560 (the
    MNIST MLP), so LiSSA or CG would need hundreds of full-data products, while EK-FAC itself scores the best LDS
    measured there."""
    if name != "auto":
        return name
    if fm.dim <= EXACT_AUTO_MAX_PARAMS:
        return "exact"
    from .kfac import kronecker_modules

    layers = kronecker_modules(fm)
    one_layer = len(layers) == 1 and {n for n in (layers[0].weight, layers[0].bias) if n} == set(fm.names)
    return "lissa" if one_layer else "ekfac"


def _merge(cls: type, given: Any, options: dict[str, Any]) -> Any:
    """``given`` (an instance of ``cls`` or None) with ``options`` applied; an option that contradicts ``given``
    is an error, never a silent override."""
    base = given if given is not None else cls()
    if not isinstance(base, cls):
        raise UserError(f"expected {cls.__name__}, got {type(base).__name__}")
    mine = {k: v for k, v in options.items() if _FIELDS[k] is cls}
    if given is not None:
        clash = [k for k, v in mine.items() if getattr(given, k) != v]
        if clash:
            raise UserError(f"{', '.join(clash)} given both as an argument and in {cls.__name__} with different values: "
                            "give it once")
    return validate(dataclasses.replace(base, **mine))


class InfluenceEngine:
    """Influence of every training example on test predictions, from a cached gradient store.

    ``model``: an ``nn.Module``, a loaded :class:`~trainfluence.checkpoint.Checkpoint`, or the path of a
    trainfluence checkpoint (``arch=`` builds a ``module:callable`` architecture the checkpoint names — only the
    caller can allow that).  ``train_dataset``: anything yielding ``(input, label)``.

    Options are the fields of :class:`~trainfluence.settings.influence.InfluenceSettings` (``solver``,
    ``damping``, ``weight_decay`` — default: the checkpoint's —, ``hessian_samples``, ``strict`` …) and of
    :class:`~trainfluence.settings.influence.StoreSettings` (``params``, ``projection_dim`` …), given as keywords
    or as ``settings=`` / ``store=`` objects; ``solver_settings`` is a dict or the solver's settings dataclass.
    The defaults are those of the command line.
    """

    def __init__(self, model: nn.Module | Checkpoint | str | Path, train_dataset: Any, *,
                 settings: InfluenceSettings | None = None, store: StoreSettings | None = None,
                 solver_settings: Any = None, cache_dir: str | Path | None = "cache", device: str | torch.device = "auto",
                 arch: str | None = None, **options: Any):
        unknown = sorted(set(options) - set(_FIELDS))
        if unknown:
            raise UserError(f"InfluenceEngine has no option {unknown[0]!r}: use {', '.join(sorted(_FIELDS))}")
        self.settings: InfluenceSettings = _merge(InfluenceSettings, settings, options)
        self.store_settings: StoreSettings = _merge(StoreSettings, store, options)
        self.device = resolve_device(device) if isinstance(device, str) else device
        ckpt = load_checkpoint(model, device=self.device, arch=arch) if isinstance(model, (str, Path)) else model
        if isinstance(ckpt, Checkpoint):
            model, self.model_id = ckpt.model, ckpt.content_hash
        else:
            model, self.model_id = ckpt, model_fingerprint(ckpt)
        wd = self.settings.weight_decay
        if wd is None:  # the one place the objective's weight decay is decided
            wd = ckpt.meta.weight_decay if isinstance(ckpt, Checkpoint) else 0.0
        self.model = model
        self.objective = Objective(weight_decay=float(wd))
        self.source: ExampleSource = as_source(train_dataset)
        self.fm = FunctionalModel(model, self.store_settings.params, device=self.device)
        self.computer = GradientComputer(self.fm, self.objective, self.store_settings.memory_budget)
        self.solver = make_solver(resolve_solver(self.settings.solver, self.fm), solver_settings)
        self._damping = None if self.settings.damping == "auto" else float(self.settings.damping)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.store: GradientStore | None = None
        self.build_report: BuildReport | None = None
        self.reports: list[SolveReport] = []  # how every solve behind this engine's results ended
        self._op: HessianOperator | None = None
        self._index: GradientIndex | None = None

    # ---- building blocks -----------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return len(self.source)

    @property
    def operator(self) -> HessianOperator:
        """H = C + (wd + λ)I over the training set (or its ``hessian_samples`` subset), C the curvature."""
        if self._op is None:
            self._op = HessianOperator(self.fm, self.objective, self.source, self._damping or 0.0,
                                       curvature=self.settings.curvature, batch_size=self.settings.hessian_batch_size,
                                       hessian_samples=self.settings.hessian_samples,
                                       memory_budget=self.store_settings.memory_budget)
            if self.cache_dir is not None:  # Kronecker fits kept on disk, like s_test (a fit needs no built store)
                self._op.curvature_cache = (self.cache_dir, {"model": self.model_id, "train": self.source.fingerprint(),
                                                             "params": self.fm.names, "objective": self.objective.name})
            if self._damping is None:
                self._damping = self._op.damping = self._auto_damping(self._op)
        return self._op

    @property
    def damping(self) -> float:
        """λ as used: the number given, or the one ``damping="auto"`` chose from the measured spectrum."""
        if self._damping is None:
            return self.operator.damping
        return self._damping

    def _auto_damping(self, op: HessianOperator) -> float:
        """λ = DAMPING_AUTO_FRACTION × mean eigenvalue of the Gauss–Newton matrix (trace/p; EK-FAC's eigenvalues
        have exactly the blocks' traces), over the examples an ekfac / kfac solver estimates its factors from.
        With the Hessian as curvature, a warning when H + (wd + λ)I is still indefinite (its lowest eigenvalue
        estimated by power iteration on a sample)."""
        st = self.solver.settings  # a Kronecker solver's own factors (its sample), so they are estimated once
        mean = float(op.kronecker(corrected=True, settings=st if isinstance(st, KroneckerSettings) else None)
                     .eigenvalues().mean())
        damping = DAMPING_AUTO_FRACTION * mean
        if self.settings.curvature == "hessian":
            sample = op.subset(1024)
            sample.damping = damping
            top = sample.top_eigenvalue(iterations=50)
            lowest = top - sample.top_eigenvalue(iterations=100, seed=1, matvec=lambda v: top * v - sample.hvp(v[None])[0])
            if lowest <= 0:
                warn(f"the damped Hessian is indefinite (lowest eigenvalue about {lowest:.3g} with damping {damping:.3g}): "
                     f"pass --damping above {damping - lowest:.3g}, or --curvature ggn")
        return damping

    def describe(self) -> dict[str, Any]:
        """Everything s_test depends on besides the model and training data (saved beside every result)."""
        return {"solver": self.solver.name, "solver_settings": to_dict(self.solver.settings),
                "curvature": self.settings.curvature, "damping": self.settings.damping,
                "weight_decay": self.objective.weight_decay, "objective": self.objective.name, "params": self.fm.names,
                "hessian_samples": self.settings.hessian_samples,
                "hessian_batch_size": self.settings.hessian_batch_size}

    def plan(self) -> str:
        """One line: what this engine will do at its settings, and the gradient pass's cost estimated from a timed
        pilot batch (printed by the CLI before any long work starts)."""
        n, p = self.n, self.fm.dim
        pilot = np.arange(min(32, n))
        self.gradients(self.source.tensors(pilot[:4]))  # warm up (vmap's first call is slower)
        start = time.perf_counter()
        self.gradients(self.source.tensors(pilot))
        per_example = (time.perf_counter() - start) / len(pilot)
        k = self.store_settings.projection_dim
        dim = min(k, p) if k else p
        bytes_per = 2 if self.store_settings.resolved_dtype == "fp16" else 4
        chosen = self.solver.name + (" (auto)" if self.settings.solver == "auto" else "")
        damping = "auto" if self.settings.damping == "auto" else f"{self.settings.damping:g}"
        passes = {"ekfac": 2, "kfac": 1}.get(self.solver.name, 0)
        return (f"influence: solver {chosen}, curvature {self.settings.curvature}, damping {damping}, parameters "
                f"{self.store_settings.params} ({p:,}); gradient store {n:,} × {dim:,} "
                f"({n * dim * bytes_per / 2**20:,.0f} MiB); a gradient pass over the training set ≈ {per_example * n:.0f} s"
                + (f", the solver's factors {passes} pass{'es' if passes > 1 else ''} of one forward and 1 to K − 1 "
                   "backward passes per batch (fewer when the predictions are confident)" if passes else "")
                + " (a store already built is reused)")

    def build_cache(self, *, shard: tuple[int, int] = (0, 1)) -> GradientStore:
        """Compute (or reuse) the per-example gradient store of the training set."""
        self.build_report = build_store(self.model, self.source, objective=self.objective, settings=self.store_settings,
                                        cache_dir=self.cache_dir or Path("cache"), shard=shard, device=self.device,
                                        model_id=self.model_id, fm=self.fm)
        self.store = self.build_report.store
        return self.store

    def _require_store(self) -> GradientStore:
        if self.store is None:
            self.build_cache()
        assert self.store is not None
        self.store.require_complete()
        return self.store

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities of the model on a batch (CPU)."""
        with torch.no_grad():
            return torch.softmax(self.fm(self.fm.params, x.to(self.device)), 1).cpu()

    def gradients(self, data: Any) -> torch.Tensor:
        """Full per-example loss gradients ∇ℓ(z) [m, p] of ``data`` (test points or training examples)."""
        x, y = as_source(data).tensors()
        if not len(y):
            return torch.zeros(0, self.fm.dim, device=self.device)
        with torch.no_grad():
            G = torch.cat([self.fm.flatten(eg.grads) for eg in self.computer.batches(x, y)])
        return require_finite(G, "per-example gradients", FIX_MODEL)

    def inverse_hvp(self, V: torch.Tensor) -> torch.Tensor:
        """H⁻¹ V for the rows of V, by the engine's solver; an unconverged solve warns (or, strict, stops)."""
        out = self.solver.inverse_hvp(self.operator, V.to(self.device))
        self._record(self.solver.report)
        require_finite(out, f"the {self.solver.name} solution H⁻¹v", FIX_SOLVE)
        lost = (out.abs().amax(1) == 0) & (V.to(out.device).abs().amax(1) > 0)
        if bool(lost.any()):
            raise UserError(f"the {self.solver.name} solve returned 0 for a non-zero gradient (underflow): lower "
                            f"--damping (now {self.damping:g}) or the solver's scale")
        return out

    def _record(self, report: SolveReport | None) -> None:
        """Keep ``report`` (once) with this engine's results; warn about — or, strict, refuse — an unconverged solve."""
        if report is None or any(r is report for r in self.reports):
            return
        self.reports.append(report)
        if not report.converged:
            message = f"{report.describe()}; {self.solver.advice}"
            if self.settings.strict:
                raise UserError(message + " (or drop --strict to accept the estimate)")
            warn(message + " (--strict makes this an error)")

    def _stest_cache(self) -> STestCache | None:
        if self.cache_dir is None:
            return None
        return STestCache(self.cache_dir, {"model": self.model_id, "train": self.source.fingerprint(), **self.describe()})

    def s_test(self, test: Any) -> torch.Tensor:
        """s_test = H⁻¹ ∇ℓ(z_test) for every test point [m, p]; cached on disk (no gradient store needed)."""
        source = as_source(test)
        cache = self._stest_cache()
        if cache is not None:
            hit = cache.load(source.fingerprint(), (len(source), self.fm.dim))
            if hit is not None:
                self._record(SolveReport(**hit[1]))
                return torch.from_numpy(hit[0]).to(self.device)
        # in steps of as many test points as the memory budget holds (a resnet18's gradients: 6 per GiB; the solve
        # works on copies of them), the rows filled into one result; up to 1,024 points of the default CNN: one step
        x, y = source.tensors()
        step = self._pass_rows()
        result = torch.empty(0)
        reports = []
        for a in range(0, max(len(y), 1), step):
            part = self.inverse_hvp(self.gradients((x[a : a + step], y[a : a + step])))
            reports.append(self.solver.report)
            if len(part) == len(y):  # one step: the whole result
                result = part
                break
            if a == 0:
                result = part.new_empty((len(y), part.shape[1]))
            result[a : a + len(part)] = part
        if cache is not None:  # the report kept is the first unconverged step's, else the last one's
            report = next((r for r in reports if r is not None and not r.converged), reports[-1])
            cache.save(source.fingerprint(), result.float().cpu().numpy(), to_dict(report))
        return result

    def _pass_rows(self) -> int:
        """Rows of per-example gradients a pass (s_test, self-influence) takes per step: what --memory-budget holds."""
        return rows_within(self.fm.dim, self.store_settings.memory_budget)

    def _query_vectors(self, s: torch.Tensor) -> np.ndarray:
        """s_test in the store's space (projected with the store's projection when there is one)."""
        projector = self._require_store().projector(self.fm, self.objective)
        q = projector.project(s) if projector is not None else s
        return q.float().cpu().numpy()

    # ---- scores --------------------------------------------------------------------------------------------
    def influence(self, test: Any) -> np.ndarray:
        """I_up,loss(zᵢ, z_test) for every test point and training example, [n_test, n_train]."""
        store = self._require_store()
        q = self._query_vectors(self.s_test(test))
        out = np.empty((len(q), store.n), dtype=np.float32)
        for start, block in store.iter_blocks():
            out[:, start : start + len(block)] = -(q @ block.T)
        return require_finite(out, "influence scores", FIX_SOLVE)

    def index(self, settings: SearchSettings | None = None) -> GradientIndex:
        if self._index is None or (settings is not None and settings != self._index.settings):
            self._index = GradientIndex(self._require_store(), settings)
        return self._index

    def top_k(self, test: Any, top: int = 10, *, search: SearchSettings | None = None) -> InfluenceTopK:
        """The ``top`` most helpful and most harmful training examples per test point, by the store's faiss index."""
        q = self._query_vectors(self.s_test(test))
        found = self.index(search).search(q, top)
        # influence = −⟨q, g⟩: largest inner products are the most helpful, smallest the most harmful
        return InfluenceTopK(found.largest_index, -found.largest_score, found.smallest_index, -found.smallest_score)

    def removal_effect(self, test: Any, train_indices: Any, *, s_test: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Predicted change of each test loss if each given training example were removed — one Newton step with the
        example's own curvature taken out, not only the first-order −I_up,loss/n — and each example's leverage:
        ``(change [n_test, m], leverage [m])`` (:mod:`trainfluence.removal`)."""
        return newton_removal(self, test, train_indices, s_test=s_test)

    def params_influence(self, train_indices: Any) -> torch.Tensor:
        """I_up,params(z) = −H⁻¹∇ℓ(z) for the given training examples, [m, p]."""
        x, y = self.source.tensors(np.atleast_1d(np.asarray(train_indices)))
        return -self.inverse_hvp(self.gradients((x, y)))

    def pixel_influence(self, test: Any, train_indices: Any, *, test_row: int = 0,
                        s_test: torch.Tensor | None = None) -> torch.Tensor:
        """I_pert,loss of the given training images for one test point (row ``test_row`` of ``test``), shaped
        like the images.  One Jacobian-vector product per image: ⟨s, ∇_θℓ(x, θ)⟩ is the derivative of ℓ along
        θ + εs, so ∇ₓ of it is the forward-mode derivative (direction s) of ∇ₓℓ.  Pass ``s_test`` (that row's
        vector) when it is already solved; otherwise it is solved (or read from the cache) here."""
        s = (self.s_test(test)[test_row] if s_test is None else s_test).to(self.device)
        x, y = self.source.tensors(np.atleast_1d(np.asarray(train_indices)), self.device)
        fm, obj, theta = self.fm, self.objective, self.fm.flat_params()
        x = x.to(fm.dtype)

        def input_grad(th: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            def loss(inp: torch.Tensor) -> torch.Tensor:
                out = obj.outputs(lambda z: fm(fm.unflatten(th), z), inp.unsqueeze(0))
                return obj.loss(out, yi.unsqueeze(0)).squeeze(0)

            return grad(loss)(xi)

        def one(xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return jvp(lambda th: input_grad(th, xi, yi), (theta,), (s.to(theta),))[1]

        with torch.no_grad():
            return require_finite(-vmap(one)(x, y), "pixel influence", FIX_SOLVE)

    def self_influence(self, indices: Any = None, *, labels: torch.Tensor | None = None, chunk: int | None = None) -> np.ndarray:
        """∇ℓ(z)ᵀ H⁻¹ ∇ℓ(z) for every training example (or the given ones; ``labels`` replaces their labels), ``chunk``
        examples at a time (default: as many as the memory budget holds, :func:`~trainfluence.gradients.rows_within`, or
        under ``ekfac``/``kfac`` :meth:`~trainfluence.kfac.KroneckerCurvature.batch_within`).

        ``ekfac`` and ``kfac`` never form the gradients: one forward and one backward pass per batch of examples
        gives each layer's gᵀP⁻¹g from its inputs and output gradients
        (:meth:`~trainfluence.kfac.KroneckerCurvature.example_quadratic_forms`).  The other solvers take the gradients
        from the store when it holds full ones (no projection), else compute them; ``exact`` and ``arnoldi`` whiten
        each gradient (cheap for all n), ``lissa`` and ``cg`` solve one system per example (batched, slow for large n)."""
        rows = np.arange(self.n) if indices is None else np.atleast_1d(np.asarray(indices))
        factored = self.solver.factored(self.operator) if len(rows) else None
        stored = factored is None and labels is None and self.store is not None and self.store.projection is None \
            and self.store.complete
        if chunk is None:
            chunk = factored.batch_within(self.source.tensors(rows[:1])[0][0], self.store_settings.memory_budget) \
                if factored is not None else self._pass_rows()
        out = np.empty(len(rows), dtype=np.float64)
        for start in bar(range(0, len(rows), chunk), desc=f"self-influence ({self.solver.name})", unit="chunk"):
            sel = rows[start : start + chunk]
            if stored:
                G = torch.from_numpy(self.store.read(np.sort(sel))[np.argsort(np.argsort(sel))]).to(self.device, self.fm.dtype)
                q = self.solver.quadratic_form(self.operator, G)
            else:
                x, y = self.source.tensors(sel)
                if labels is not None:
                    y = labels[start : start + len(sel)].to(y)
                q = factored.example_quadratic_forms(x, y, self.operator.shift) if factored is not None else \
                    self.solver.quadratic_form(self.operator, self.gradients((x, y)).to(self.device))
            out[start : start + len(sel)] = q.cpu().numpy()
            self._record(self.solver.report)
        return require_finite(out, "self-influence scores", FIX_SOLVE)
