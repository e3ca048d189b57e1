"""Influence settings: the gradient store, the inverse-HVP solvers, the engine and the faiss search.

One default set for ``cache``, ``explain``, ``audit`` and the Python API (:class:`InfluenceSettings` and
:class:`StoreSettings` as they stand), so a store built by one command is the store the others reuse.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from . import NONNEG, NONNEG_INT, POSITIVE_INT, Range, option


@dataclass
class StoreSettings:
    """What the gradient store holds.  Every field but ``memory_budget_mb`` is part of its key."""

    params: str = option("all", "parameters differentiated: all | last (the classifier layer) | comma-separated "
                         "module or parameter names")
    projection_dim: int | None = option(None, "random projection of every gradient to K dimensions; none: full "
                                        "gradients", Range(low=1, integer=True, none=True),
                                        aliases=("project-dim",))
    projection_seed: int = option(0, "projection seed", NONNEG_INT, aliases=("project-seed",))
    projection: str = option("countsketch", "countsketch: O(p) sparse sign sketch of each per-example gradient | "
                             "kronecker: P_out ⊗ P_in per Linear/Conv2d layer, computed from one batched forward and "
                             "backward without forming the gradients (LoGra; faster, noisier: BENCHMARKS.md) | "
                             "gaussian: dense, for comparison", choices=("countsketch", "kronecker", "gaussian"))
    projection_allocation: str = option("energy", "energy: output dims per parameter block ∝ its gradient energy, "
                                        "small blocks kept exact | uniform: one sketch of the whole vector",
                                        choices=("energy", "uniform"))
    dtype: str | None = option(None, "stored precision: fp16 | fp32; none: fp16 when projected, else fp32",
                               choices=("fp16", "fp32"))
    chunk_size: int = option(1024, "rows per resumable, checksummed chunk", POSITIVE_INT)
    memory_budget_mb: int = option(1024, "working memory for one vmap batch, or one step of a pass over per-example "
                                         "gradients (self-influence), MiB", POSITIVE_INT, flag="memory-budget")

    @property
    def resolved_dtype(self) -> str:
        return self.dtype or ("fp16" if self.projection_dim else "fp32")

    @property
    def memory_budget(self) -> int:
        return self.memory_budget_mb << 20


PRECONDITIONERS = ("ekfac", "kfac", "none")
CURVATURES = ("ggn", "hessian")
KRONECKER_LABELS = ("exact", "sampled")
#: damping "auto" = this fraction of the mean eigenvalue of the Gauss–Newton matrix (trace/p, exact from EK-FAC).
#: Measured by the linear datamodeling score for f = 0.001, 0.01, 0.1, 1 (``scripts/bench_lds.py --damping-sweep``,
#: BENCHMARKS.md "bench:lds_damping_*"): LDS is flat over 0.001–0.1 (logistic regression 0.907–0.911, MLP
#: 0.558–0.560, CNN 0.133–0.137) and 1 costs the CNN 0.009; 0.01 is never more than 0.004 below the best fraction.
DAMPING_AUTO_FRACTION = 0.01
#: solver "auto" solves exactly up to this many parameters: the dense H costs p/chunk batched passes over the data and
#: an eigendecomposition of under a second, less than the iterative solvers' own start-up
EXACT_AUTO_MAX_PARAMS = 1024


@dataclass
class ExactSettings:
    """``exact``: the dense Hessian and its eigendecomposition."""

    max_memory_gb: float | None = option(None, "refuse when the dense p×p solve needs more than this; none: 80% of "
                                         "the memory available now", Range(low=0, low_open=True, none=True))


@dataclass
class KroneckerSettings:
    """``ekfac`` / ``kfac``: Kronecker-factored Gauss–Newton (EK-FAC corrects K-FAC's eigenvalues)."""

    samples: int | None = option(None, "training examples the factors are estimated from; none: all of the "
                                 "Hessian's examples", Range(low=1, integer=True, none=True))
    batch_size: int = option(128, "examples per factor batch at most; fewer when --memory-budget holds fewer", POSITIVE_INT)
    seed: int = option(0, "seed of the sample, when --*-samples is below the Hessian's examples, and of the "
                       "sampled labels", NONNEG_INT)
    labels: str = option("exact", "the output curvature each example contributes: exact (the Gauss–Newton "
                         "expectation over every class, up to --*-trace-tol: at most K − 1 backward passes per "
                         "batch) | sampled (one label drawn from the model's prediction per example, one pass: the "
                         "Fisher by Monte Carlo, as Kronfluence estimates it; against exact at its default tolerance, "
                         "measured 0.64× the time on the default CNN at LDS +0.002 and LDS −0.007 on the MLP, "
                         "BENCHMARKS.md)", choices=KRONECKER_LABELS)
    trace_tol: float = option(0.01, "with exact labels, the share of each batch's output curvature left out: per "
                              "batch, the fewest leading eigen-directions of each example's H_f (one backward pass "
                              "each) whose eigenvalues hold all but this share of the batch's trace; 0: all K − 1 "
                              "(on the default CNN 0.71× the time of all K − 1 at the same LDS, BENCHMARKS.md)",
                              Range(low=0, high=1, high_open=True))


    def output_curvature(self) -> dict[str, object]:
        """What decides how each example's output curvature enters the fit (part of the fit's identity): the labels,
        and their seed when sampled or the trace tolerance when exact."""
        return {"labels": self.labels, **({"label_seed": self.seed} if self.labels == "sampled" else
                                          {"trace_tol": self.trace_tol})}


@dataclass
class LissaSettings:
    """``lissa``: the stochastic Neumann recursion (Koh & Liang; Agarwal et al.), preconditioned, with a growing
    minibatch and a stopping rule on the residual."""

    preconditioner: str = option("ekfac", "P in x ← x + P⁻¹(g − H_B x)/s: ekfac | kfac | none (classic LiSSA)",
                                 choices=PRECONDITIONERS)
    momentum: bool = option(True, "heavy-ball acceleration, its step and momentum set from the extreme eigenvalues "
                            "of P⁻¹H (Lanczos on the held examples); --no-lissa-momentum: the plain recursion")
    depth: int = option(1000, "steps at most", POSITIVE_INT)
    batch_size: int = option(256, "examples per stochastic product at the start; doubled whenever the residual stops "
                             "falling, up to all of the Hessian's examples", POSITIVE_INT)
    scale: float | str = option("auto", "s, above the top eigenvalue of P⁻¹H; auto = scale-factor × a Lanczos "
                                "estimate", Range(low=0, low_open=True, high=1e12, words=("auto",)))
    scale_factor: float = option(1.5, "multiple of the estimated top eigenvalue used by scale auto", Range(low=1, high=100))
    tol: float = option(1e-3, "stop when |(H + λI)x − g| / |g| over the Hessian's examples is below this for every "
                        "test point", Range(low=0, low_open=True, high=1, high_open=True))
    seed: int = option(0, "minibatch sampling seed", NONNEG_INT)


@dataclass
class CGSettings:
    """``cg``: preconditioned conjugate gradients on full-data curvature-vector products, every test point at once."""

    preconditioner: str = option("ekfac", "ekfac | kfac | none", choices=PRECONDITIONERS)
    rtol: float = option(1e-4, "stop when |H x − g| ≤ rtol |g| for every right-hand side",
                         Range(low=0, low_open=True, high=1, high_open=True))
    maxiter: int = option(300, "iterations at most", POSITIVE_INT)


@dataclass
class ArnoldiSettings:
    """``arnoldi``: the top eigenpairs of H (ARPACK), inverted on their subspace."""

    rank: int | str = option("auto", "eigenpairs kept; auto: doubled from 64 until the smallest kept eigenvalue is "
                             "within 2× of wd + λ (or max-rank)", Range(low=1, integer=True, words=("auto",)))
    max_rank: int = option(2048, "the most eigenpairs rank auto keeps", POSITIVE_INT)
    tol: float = option(1e-4, "relative accuracy of the eigenvalues (0: machine precision)", NONNEG)
    maxiter: int | None = option(None, "ARPACK restarts; none: its own choice", Range(low=1, integer=True, none=True))
    seed: int = option(0, "starting vector seed", NONNEG_INT)


#: solver name → its settings (the solvers themselves are registered in :mod:`trainfluence.solvers`)
SOLVER_SETTINGS: dict[str, type] = {"exact": ExactSettings, "lissa": LissaSettings, "cg": CGSettings,
                                    "arnoldi": ArnoldiSettings, "ekfac": KroneckerSettings, "kfac": KroneckerSettings}


@dataclass
class InfluenceSettings:
    """The influence engine: which solver, which curvature, how much damping."""

    solver: str = option("auto", f"inverse-HVP solver: auto (exact up to {EXACT_AUTO_MAX_PARAMS} parameters, else lissa "
                         "when the selected parameters are one layer, ekfac when they span several — see BENCHMARKS.md) | " + " | ".join(SOLVER_SETTINGS),
                         choices=("auto", *SOLVER_SETTINGS))
    curvature: str = option("ggn", "ggn: the Gauss–Newton matrix JᵀH_fJ (positive semi-definite; what K-FAC/EK-FAC "
                            "approximate) | hessian: the exact Hessian (indefinite on a deep net: damping must exceed "
                            "its most negative eigenvalue)", choices=CURVATURES)
    damping: float | str = option("auto", "λ in H = C + (wd + λ)I, C the curvature; auto = "
                                  f"{DAMPING_AUTO_FRACTION:g} × the mean eigenvalue of the Gauss–Newton matrix "
                                  "(its trace / p, measured), recorded with the results",
                                  Range(low=0, high=1e8, words=("auto",)))
    weight_decay: float | None = option(None, "wd of the training objective; none: the checkpoint's",
                                        Range(low=0, none=True))
    hessian_samples: int | None = option(None, "build H from this many random training examples; none: all",
                                         Range(low=1, integer=True, none=True))
    hessian_batch_size: int = option(256, "examples per Hessian-vector product batch", POSITIVE_INT)
    strict: bool = option(False, "an unconverged solve (LiSSA at its step limit, CG at maxiter) is an error, "
                          "not a warning")


FLAT_MAX_BYTES = 2 << 30  # --index auto: the flat index's float32 copy of the store above this → stream


@dataclass
class SearchSettings:
    """faiss top-k over the store."""

    kind: str = option("auto", "auto: flat while its in-memory copy of the store fits FLAT_MAX_BYTES (2 GiB), else "
                       "stream | flat (exact, the store in RAM as float32) | stream (exact, reads the store from disk "
                       "block by block: memory bounded by one block whatever n is) | fp16 (exhaustive over fp16 "
                       "rows) | ivf (approximate)", choices=("auto", "flat", "stream", "fp16", "ivf"), flag="index")
    nlist: int | None = option(None, "ivf cells; none: about 4·√n", Range(low=1, integer=True, none=True))
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
        owners = [n for n, c in SOLVER_SETTINGS.items() if isinstance(given, c)]
        if owners:  # e.g. --lissa-* flags with --solver auto, which chose another solver for this model
            raise UserError(f"{type(given).__name__} (--{owners[0]}-… options) configure --solver {owners[0]}, but the "
                            f"solver is {name}: pass --solver {owners[0]} (solver='{owners[0]}') or drop them")
        raise UserError(f"{name} settings must be a dict or {cls.__name__}, got {type(given).__name__}")
    return validate(settings, prefix=f"{name}-")
