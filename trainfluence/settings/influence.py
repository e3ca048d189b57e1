"""Influence settings: the gradient store, the inverse-HVP solvers, the engine and the faiss search.

One default set for ``cache``, ``explain``, ``audit`` and the Python API (:class:`InfluenceSettings` and
:class:`StoreSettings` as they stand), so a store built by one command is the store the others reuse.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from . import NONNEG, NONNEG_INT, POSITIVE, POSITIVE_INT, Range, option


@dataclass
class StoreSettings:
    """What the gradient store holds.  Every field but ``memory_budget_mb`` is part of its key."""

    params: str = option("last", "parameters differentiated: all | last (the classifier layer) | comma-separated "
                         "module or parameter names")
    projection_dim: int | None = option(None, "random projection of every gradient to K dimensions (default: none, "
                                        "full gradients)", Range(low=1, integer=True, none=True),
                                        aliases=("project-dim",))
    projection_seed: int = option(0, "projection seed", NONNEG_INT, aliases=("project-seed",))
    projection: str = option("countsketch", "countsketch: O(p) sparse sign sketch | gaussian: dense, for comparison",
                             choices=("countsketch", "gaussian"))
    projection_allocation: str = option("energy", "energy: output dims per parameter block ∝ its gradient energy, "
                                        "small blocks kept exact | uniform: one sketch of the whole vector",
                                        choices=("energy", "uniform"))
    dtype: str | None = option(None, "stored precision: fp16 | fp32 (default fp16 when projected, else fp32)",
                               choices=("fp16", "fp32"))
    chunk_size: int = option(1024, "rows per resumable, checksummed chunk", POSITIVE_INT)
    memory_budget_mb: int = option(1024, "working memory for one vmap batch, MiB", POSITIVE_INT, flag="memory-budget")

    @property
    def resolved_dtype(self) -> str:
        return self.dtype or ("fp16" if self.projection_dim else "fp32")

    @property
    def memory_budget(self) -> int:
        return self.memory_budget_mb << 20


@dataclass
class ExactSettings:
    """``exact``: the dense Hessian and its eigendecomposition."""

    max_params: int = option(6000, "refuse above this many parameters (a dense p×p float64 matrix)", POSITIVE_INT)


@dataclass
class LissaSettings:
    """``lissa``: the stochastic Neumann recursion (Koh & Liang; Agarwal et al.)."""

    depth: int = option(2000, "recursion steps per repeat (upper bound; early stopping may end sooner)", POSITIVE_INT)
    repeats: int = option(1, "independent runs averaged", POSITIVE_INT)
    batch_size: int = option(128, "examples per stochastic Hessian-vector product", POSITIVE_INT)
    scale: float | str = option("auto", "s, above the top eigenvalue of H; auto = scale-factor × a power-iteration "
                                "estimate", Range(low=0, low_open=True, words=("auto",)))
    scale_factor: float = option(1.5, "multiple of the estimated top eigenvalue used by scale auto",
                                 Range(low=1))
    scale_samples: int = option(1024, "examples in the power iteration behind scale auto", POSITIVE_INT)
    tol: float = option(1e-4, "stop when the relative change of the estimate over check-every steps is below this",
                        POSITIVE)
    check_every: int = option(25, "steps between convergence checks", POSITIVE_INT)
    seed: int = option(0, "minibatch sampling seed", NONNEG_INT)


@dataclass
class CGSettings:
    """``cg``: conjugate gradients on full-data Hessian-vector products."""

    rtol: float = option(1e-6, "stop when |H x − v| ≤ rtol |v|", POSITIVE)
    maxiter: int = option(500, "iterations per right-hand side", POSITIVE_INT)


@dataclass
class ArnoldiSettings:
    """``arnoldi``: the top eigenpairs of H (ARPACK), inverted on their subspace."""

    rank: int = option(50, "eigenpairs kept", POSITIVE_INT)
    tol: float = option(1e-4, "relative accuracy of the eigenvalues (0: machine precision)", NONNEG)
    maxiter: int | None = option(None, "ARPACK restarts (default: its own)", Range(low=1, integer=True, none=True))
    seed: int = option(0, "starting vector seed", NONNEG_INT)


#: solver name → its settings (the solvers themselves are registered in :mod:`trainfluence.solvers`)
SOLVER_SETTINGS: dict[str, type] = {"exact": ExactSettings, "lissa": LissaSettings, "cg": CGSettings,
                                    "arnoldi": ArnoldiSettings}


@dataclass
class InfluenceSettings:
    """The influence engine: which solver, which curvature, how much damping."""

    solver: str = option("exact", "inverse-HVP solver: " + " | ".join(SOLVER_SETTINGS), choices=tuple(SOLVER_SETTINGS))
    damping: float = option(0.01, "λ in H = ∇²L + (wd + λ)I", Range(low=0, high=1e8))
    weight_decay: float | None = option(None, "wd of the training objective (default: the checkpoint's)",
                                        Range(low=0, none=True))
    hessian_samples: int | None = option(None, "build H from this many random training examples (default: all)",
                                         Range(low=1, integer=True, none=True))
    hessian_batch_size: int = option(256, "examples per Hessian-vector product batch", POSITIVE_INT)
    strict: bool = option(False, "an unconverged solve (LiSSA at its step limit, CG at maxiter) is an error, "
                          "not a warning")


@dataclass
class SearchSettings:
    """faiss top-k over the store."""

    kind: str = option("flat", "flat (exact) | fp16 (exhaustive over fp16 rows) | ivf (approximate)",
                       choices=("flat", "fp16", "ivf"), flag="index")
    nlist: int | None = option(None, "ivf cells (default ≈ 4·√n)", Range(low=1, integer=True, none=True))
    nprobe: int = option(16, "ivf cells searched per query", POSITIVE_INT)


def solver_settings(name: str, given: object = None) -> object:
    """The settings dataclass of solver ``name`` from None (defaults), a dict or an instance."""
    import dataclasses

    from . import validate

    if name not in SOLVER_SETTINGS:
        raise UserError(f"unknown solver {name!r}: use one of {', '.join(SOLVER_SETTINGS)}")
    cls = SOLVER_SETTINGS[name]
    if given is None:
        settings = cls()
    elif isinstance(given, dict):
        unknown = set(given) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UserError(f"unknown {name} setting(s) {', '.join(sorted(unknown))}: use "
                            f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        settings = cls(**given)
    elif isinstance(given, cls):
        settings = given
    else:
        raise UserError(f"{name} settings must be a dict or {cls.__name__}, got {type(given).__name__}")
    return validate(settings, prefix=f"{name}-")
