"""Koh & Liang influence functions over the gradient store.

Definitions (model in eval mode, selected parameters θ, checkpoint θ̂):

    L(θ) = (1/n) Σᵢ ℓ(zᵢ, θ) + (wd/2)‖θ‖²          H = ∇²L(θ̂) + λI   (λ = damping)
    s_test = H⁻¹ ∇ℓ(z_test)
    I_up,loss(z, z_test) = −∇ℓ(z_test)ᵀ H⁻¹ ∇ℓ(z) = −⟨s_test, ∇ℓ(z)⟩
        positive: upweighting z raises the test loss (harmful); negative: helpful.
        Removing z changes the test loss by about −I_up,loss(z, z_test) / n.
    I_up,params(z) = −H⁻¹ ∇ℓ(z)                      (dθ̂/dε when z's weight grows by ε)
    I_pert,loss(z, z_test) = −∇ℓ(z_test)ᵀ H⁻¹ ∇ₓ∇_θ ℓ(z) = −∇ₓ ⟨s_test, ∇_θ ℓ(z)⟩, a map over z's pixels:
        moving z's image by δ changes the test loss by about ⟨I_pert,loss, δ⟩ / n.
    self-influence(z) = ∇ℓ(z)ᵀ H⁻¹ ∇ℓ(z)  (≥ 0 when H is positive definite)

With a projected store the scores are −⟨P s_test, P ∇ℓ(z)⟩ ≈ I_up,loss (inner products preserved in expectation).

    >>> engine = InfluenceEngine(model, train_set, solver="lissa", damping=0.01)
    >>> engine.build_cache()
    >>> scores = engine.influence(test_set)          # [n_test, n_train], I_up,loss
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import grad, jvp, vmap

from .checkpoint import load_checkpoint
from .data.source import ExampleSource, as_source
from .device import resolve_device
from .errors import UserError
from .gradients import GradientComputer
from .hvp import HessianOperator
from .objective import FunctionalModel, Objective
from .progress import bar
from .search import GradientIndex, SearchSettings
from .settings import stable_hash, to_dict, write_json
from .solvers import make_solver
from .store import GradientStore, StoreSettings, build_store


@dataclass
class InfluenceTopK:
    """Per test point: the k most helpful (most negative I_up,loss first) and most harmful (most positive first)."""

    helpful_index: np.ndarray  # [m, k]
    helpful_score: np.ndarray  # [m, k] I_up,loss, ascending
    harmful_index: np.ndarray  # [m, k]
    harmful_score: np.ndarray  # [m, k] I_up,loss, descending


class InfluenceEngine:
    """Influence of every training example on test predictions, from a cached gradient store.

    ``model``: an ``nn.Module`` or the path of a trainfluence checkpoint (then ``weight_decay`` defaults to the
    checkpoint's).  ``train_dataset``: anything yielding ``(input, label)``.  ``solver``: ``exact`` | ``lissa`` |
    ``cg`` | ``arnoldi`` with ``solver_settings`` (dataclass or dict).  ``params``: ``all`` | ``last`` | module
    names.  ``projection_dim``: store gradients projected to k dimensions (None: full gradients).
    ``hessian_samples``: build H from a seeded random subset of the training set (None: all of it).
    """

    def __init__(
        self,
        model: nn.Module | str | Path,
        train_dataset: Any,
        *,
        solver: str = "lissa",
        damping: float = 0.01,
        params: str = "all",
        projection_dim: int | None = None,
        cache_dir: str | Path | None = "cache",
        weight_decay: float | None = None,
        solver_settings: Any = None,
        hessian_samples: int | None = None,
        hessian_batch_size: int = 256,
        projection_seed: int = 0,
        store_settings: StoreSettings | None = None,
        device: str | torch.device = "auto",
    ):
        self.device = resolve_device(device) if isinstance(device, str) else device
        if isinstance(model, (str, Path)):
            ckpt = load_checkpoint(model, device=self.device)
            model = ckpt.model
            if weight_decay is None:
                weight_decay = ckpt.meta.weight_decay
        if damping < 0:
            raise UserError(f"damping must be non-negative, got {damping}")
        self.model = model
        self.objective = Objective(weight_decay=float(weight_decay or 0.0))
        self.source: ExampleSource = as_source(train_dataset)
        self.store_settings = store_settings or StoreSettings(params=params, project_dim=projection_dim, project_seed=projection_seed)
        self.store_settings.validate()
        self.fm = FunctionalModel(model, self.store_settings.params, device=self.device)
        self.computer = GradientComputer(self.fm, self.objective, self.store_settings.memory_budget)
        self.solver = make_solver(solver, solver_settings)
        self.damping = float(damping)
        self.hessian_samples, self.hessian_batch_size = hessian_samples, hessian_batch_size
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.store: GradientStore | None = None
        self._op: HessianOperator | None = None
        self._index: GradientIndex | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, train_dataset: Any, **kwargs: Any) -> "InfluenceEngine":
        return cls(path, train_dataset, **kwargs)

    # ---- building blocks -----------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return len(self.source)

    @property
    def operator(self) -> HessianOperator:
        """H = ∇²L + λI over the training set (or its ``hessian_samples`` subset)."""
        if self._op is None:
            self._op = HessianOperator(self.fm, self.objective, self.source, self.damping,
                                       batch_size=self.hessian_batch_size, hessian_samples=self.hessian_samples)
        return self._op

    def settings(self) -> dict[str, Any]:
        """Everything s_test depends on besides the model and training data (saved beside cached s_test)."""
        return {"solver": self.solver.name, "solver_settings": to_dict(self.solver.settings), "damping": self.damping,
                "weight_decay": self.objective.weight_decay, "objective": self.objective.name, "params": self.fm.names,
                "hessian_samples": self.hessian_samples, "hessian_batch_size": self.hessian_batch_size}

    def build_cache(self, *, shard: tuple[int, int] = (0, 1)) -> GradientStore:
        """Compute (or reuse) the per-example gradient store of the training set."""
        report = build_store(self.model, self.source, objective=self.objective, settings=self.store_settings,
                             cache_dir=self.cache_dir or Path("cache"), shard=shard, device=self.device)
        self.store = report.store
        return self.store

    def _require_store(self) -> GradientStore:
        if self.store is None:
            self.build_cache()
        assert self.store is not None
        self.store.require_complete()
        return self.store

    def gradients(self, data: Any) -> torch.Tensor:
        """Full per-example loss gradients ∇ℓ(z) [m, p] of ``data`` (test points or training examples)."""
        x, y = as_source(data).tensors()
        with torch.no_grad():
            return torch.cat([self.fm.flatten(eg.grads) for eg in self.computer.batches(x, y)]) if len(y) else torch.zeros(0, self.fm.dim)

    def inverse_hvp(self, V: torch.Tensor) -> torch.Tensor:
        """H⁻¹ V for the rows of V, by the engine's solver."""
        return self.solver.inverse_hvp(self.operator, V.to(self.device))

    def s_test(self, test: Any) -> torch.Tensor:
        """s_test = H⁻¹ ∇ℓ(z_test) for every test point [m, p]; cached on disk beside the store."""
        source = as_source(test)
        path = None
        if self.cache_dir is not None:
            store = self._require_store()
            folder = store.root / "stest" / stable_hash(self.settings())
            path = folder / f"{source.fingerprint()}.npy"
            if path.is_file():
                cached = np.load(path)
                if cached.shape == (len(source), self.fm.dim):
                    return torch.from_numpy(cached).to(self.device)
        result = self.inverse_hvp(self.gradients(source))
        if path is not None:
            write_json(path.parent / "settings.json", self.settings())
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, result.float().cpu().numpy())
            tmp.replace(path)
        return result

    def _query_vectors(self, s: torch.Tensor) -> np.ndarray:
        """s_test in the store's space (projected with the store's projection when there is one)."""
        projector = self._require_store().projector(self.fm.sizes, self.device)
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
        return out

    def index(self, settings: SearchSettings | None = None) -> GradientIndex:
        if self._index is None or (settings is not None and settings != self._index.settings):
            self._index = GradientIndex(self._require_store(), settings)
        return self._index

    def top_k(self, test: Any, k: int = 10, *, search: SearchSettings | None = None) -> InfluenceTopK:
        """The k most helpful and k most harmful training examples per test point, by the store's faiss index."""
        q = self._query_vectors(self.s_test(test))
        found = self.index(search).search(q, k)
        # influence = −⟨q, g⟩: largest inner products are the most helpful, smallest the most harmful
        return InfluenceTopK(found.largest_index, -found.largest_score, found.smallest_index, -found.smallest_score)

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
            return -vmap(one)(x, y)

    def self_influence(self, indices: Any = None, *, chunk: int = 256) -> np.ndarray:
        """∇ℓ(z)ᵀ H⁻¹ ∇ℓ(z) for every training example (or the given ones).

        With ``exact`` and ``arnoldi`` this whitens each gradient with the cached eigendecomposition (cheap for
        all n); with ``lissa`` and ``cg`` it solves one system per example (batched, but slow for large n).
        """
        rows = np.arange(self.n) if indices is None else np.atleast_1d(np.asarray(indices))
        whiten = getattr(self.solver, "whiten", None)
        out = np.empty(len(rows), dtype=np.float64)
        for start in bar(range(0, len(rows), chunk), desc=f"self-influence ({self.solver.name})", unit="chunk"):
            sel = rows[start : start + chunk]
            G = self.gradients(self.source.tensors(sel)).to(self.device)
            if whiten is not None:
                vals = whiten(self.operator, G).double().pow(2).sum(1)
            else:
                vals = (self.inverse_hvp(G).double() * G.double()).sum(1)
            out[start : start + len(sel)] = vals.cpu().numpy()
        return out
