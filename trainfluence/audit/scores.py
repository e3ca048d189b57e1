"""Mislabel scores: one number per training example, higher = more suspicious.  A registry of named scores.

The functions at the top take numpy arrays and return numpy (cleanlab's convention); :data:`SCORES` maps a name
to a function of an :class:`AuditContext`, which supplies those arrays (and computes them once).

Training dynamics (recorded by ``train`` at no extra cost, :mod:`trainfluence.dynamics`):

* ``aum`` — −(area under the margin): −mean_t (z_t[y] − max_{c≠y} z_t[c]) over the epochs' minibatch logits
  (Pleiss et al. 2020).
* ``forgetting`` — forgetting events, learned → forgotten transitions between epochs (Toneva et al. 2019);
  never-learned examples count T.
* ``avg_loss`` — the loss averaged over the epochs' minibatch logits.

From checkpoints and the influence engine:

* ``tracin`` — Σₜ ηₜ ‖∇ℓₜ(z)‖² over the saved epoch checkpoints (Pruthi et al. 2020, TracIn-CP self-influence),
  with ηₜ the learning rate of epoch t.  ``space="logits"`` (default) takes the gradient at the model's outputs,
  ∇_f ℓ = softmax(f) − onehot(y) for cross-entropy — the part of every parameter gradient that depends on the
  label; ``space="params"`` the gradient over the selected parameters.
* ``self_influence`` — ∇ℓ(z)ᵀ H⁻¹ ∇ℓ(z) at the final checkpoint, by the influence engine (Koh & Liang 2017).
* ``loss`` — ℓ(z) = −log p_y at the final checkpoint;  ``margin`` — max_{c≠y} p_c − p_y;  ``random``.

``fused`` (the default ranking) first asks whether the final model memorised the noise since the least memorised
epoch t (:class:`EarlyLearning`): of the labels that confident learning flags at t, the share the final model
predicts minus the share epoch t's checkpoint already predicted.  Below :data:`MEMORISED` (¼) it ranks by the rank
average of :data:`FUSED_FINAL` (final margin and AUM).  At or above, by the rank average of
:data:`FUSED_MEMORISED` (AUM and TracIn) read over the epochs before memorisation set in
(:func:`memorisation_onset`: up to the epoch before the first after t whose checkpoint predicts :data:`ONSET`, 10
points, more of those labels than t's).  Chosen by scripts/bench_mislabel.py over {uniform, asymmetric, instance}
× {10%, 30%} × {3, 20 epochs} (BENCHMARKS.md "bench:mislabel"): the final loss and margin are the best single
signals until the network memorises and the worst after (final loss 0.971 → 0.546 recall for 10% uniform flips).
Memorised since t was 0.00–0.01 in every 3-epoch run of the grid and 0.45–0.88 in every 20-epoch one (3 seeds,
commit efda5f9).  The share is measured against epoch t's checkpoint, not against 0, because some flagged labels
are predicted from the first epochs on (30% asymmetric flips, learnt as a pattern: 0.22 at t and 0.23 at the end
of 3 epochs) while a network that memorises may stop at half (30% uniform flips after 20 epochs: 0.00 at t, 0.49 at
the end), so the bare final share against ½, the rule before, put the latter on the wrong side.  After
memorisation, every epoch's margins and gradients blur the flips into the clean labels; TracIn over all 20 epochs
(the memorised branch before) was the best single signal in 5 of the 6 20-epoch cells but 0.033 short of
cleanlab's cross-validated 0.861 on 30% instance-dependent flips.  Read up to the onset (the first 6 to 12 of
20 epochs), AUM + TracIn lead TracIn by +0.002 to +0.037 in 5 of those cells and trail it by 0.002 in one
(asymmetric 10%; 3 seeds), and reach 0.865 on instance-dependent 30%.  On two noise seeds held out from that
choice (3 and 4): +0.001 to +0.039 in 5 cells, −0.002 in the same one, and 0.865 against cleanlab's 0.870
(BENCHMARKS.md "bench:mislabel_heldout").
Rank averaging needs no calibration between scores of different units.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..checkpoint import Checkpoint, CheckpointMeta, load_checkpoint
from ..data import ImageDataset
from ..dynamics import Dynamics, images_fingerprint, load_record
from .estimate import NoiseEstimate, estimate_noise, least_memorised_epoch
from ..errors import UserError
from ..gradients import GradientComputer
from ..influence import InfluenceEngine
from ..objective import FunctionalModel, Objective
from ..predict import Predictor
from ..progress import bar
from ..settings.audit import SCORE_NAMES
from ..train import epoch_checkpoints


# ---- numpy in, numpy out ---------------------------------------------------------------------------------
def loss_score(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-30, None))


def margin_score(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    given = probs[np.arange(len(labels)), labels]
    other = probs.copy()
    other[np.arange(len(labels)), labels] = -np.inf
    return other.max(axis=1) - given


def tracin_score(squared_norms: np.ndarray, learning_rates: np.ndarray) -> np.ndarray:
    """Σₜ ηₜ ‖gₜ(z)‖² from a [T, n] matrix of squared gradient norms and the T learning rates."""
    return np.asarray(learning_rates, dtype=np.float64) @ np.asarray(squared_norms, dtype=np.float64)


def random_score(n: int, seed: int = 0) -> np.ndarray:
    """Uniform noise from its own stream: salted, so the same seed as the planted noise's draws no correlated
    numbers (with one plain seed, instance noise's Gumbel keys and these were monotone in each other)."""
    return np.random.default_rng([seed, 0x72616E64]).random(n)


def rank_average(*scores: np.ndarray) -> np.ndarray:
    """Mean over ``scores`` of each example's normalised rank in (0, 1] (ties share their mean rank)."""
    from scipy.stats import rankdata

    return np.mean([rankdata(np.asarray(s, dtype=np.float64)) / len(s) for s in scores], axis=0)


# ---- what the scores need, computed once ----------------------------------------------------------------
@torch.no_grad()
def predict_proba(model: torch.nn.Module, data: ImageDataset, device: torch.device | str) -> np.ndarray:
    model.eval()
    out = [torch.softmax(logits, 1).cpu() for logits, _ in Predictor(model).over(data, device)]
    return torch.cat(out).double().numpy()


def output_gradient_norms(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """‖∇_f ℓ(z)‖² = ‖softmax(f) − onehot(y)‖² per example, from the [n, K] probabilities."""
    return ((probs - np.eye(probs.shape[1])[labels]) ** 2).sum(1)


def squared_gradient_norms(model: torch.nn.Module, data: ImageDataset, space: str, params: str,
                           device: torch.device | str) -> np.ndarray:
    """‖∇ℓ(z)‖² per training example, at the model's outputs (``logits``) or over parameters (``params``)."""
    if space == "logits":
        return output_gradient_norms(predict_proba(model, data, device), data.labels.numpy())
    fm = FunctionalModel(model, params, device=device)
    computer = GradientComputer(fm, Objective())
    x, y = data.tensors()
    norms = []
    with torch.no_grad():
        for eg in computer.batches(x, y):
            norms.append(sum(eg.grads[n].flatten(1).double().pow(2).sum(1) for n in fm.names).cpu())
    return torch.cat(norms).numpy()


@dataclass
class EarlyLearning:
    """Where the run stood before it memorised: the least memorised epoch t (0-based), every epoch's noise
    estimate, the estimate at t, and ``memorised``: the share of the labels flagged at t that the final model
    now predicts (near 0: it never learnt them; near 1: it memorised them)."""

    epoch: int
    rates: list[float]
    estimate: NoiseEstimate
    memorised: float

    def predicted_share(self, labels: np.ndarray, predicted: np.ndarray) -> float:
        """The share of the labels flagged at t that a model predicting the classes ``predicted`` ([n]) predicts."""
        flagged = self.estimate.flagged
        return float((predicted[flagged] == labels[flagged]).mean()) if flagged.any() else 0.0


def early_learning(labels: np.ndarray, probs_per_epoch: np.ndarray, final_probs: np.ndarray) -> EarlyLearning:
    """:class:`EarlyLearning` from each epoch's [T, n, K] probabilities and the final model's [n, K]."""
    t, rates = least_memorised_epoch(labels, probs_per_epoch)
    el = EarlyLearning(t, rates, estimate_noise(labels, probs_per_epoch[t]), 0.0)
    el.memorised = el.predicted_share(labels, final_probs.argmax(1))
    return el


def memorisation_onset(share_at: Callable[[int], float], t: int, last: int, rise: float | None = None) -> int:
    """The last epoch (0-based) before memorisation set in: the epoch before the first e > t whose checkpoint
    predicts a share of the labels flagged at t (``share_at(e)``, :meth:`EarlyLearning.predicted_share`) at least
    ``rise`` (default :data:`ONSET`) above the share t's checkpoint predicts; ``last`` when none does.  Reads the
    epochs from t on, in order, and stops at the first that rose."""
    rise = ONSET if rise is None else rise
    base = share_at(t)
    for e in range(t + 1, last + 1):
        if share_at(e) - base >= rise:
            return e - 1
    return last


def fused_epochs(el: EarlyLearning, share_at: Callable[[int], float], last: int) -> tuple[float, int | None]:
    """``fused``'s branch, for the audit and the benchmark alike: (the share of the labels flagged at t that epoch
    t's checkpoint predicts, and None when the final model has not memorised them since — rank by
    :data:`FUSED_FINAL` — else the last epoch before memorisation set in, :func:`memorisation_onset`, over which
    :data:`FUSED_MEMORISED` is read).  ``share_at(e)``: that share at epoch e's checkpoint; ``last``: the last
    epoch."""
    known = share_at(el.epoch)
    if fused_names(el.memorised - known) == FUSED_FINAL:
        return known, None
    return known, memorisation_onset(share_at, el.epoch, last)


def fused_names(memorised_since: float) -> tuple[str, ...]:
    """The signals ``fused`` averages, given how much of the flagged labels' share the final model predicts
    beyond what the least memorised epoch's checkpoint already predicted (:data:`MEMORISED`)."""
    return FUSED_MEMORISED if memorised_since >= MEMORISED else FUSED_FINAL


@dataclass
class AuditContext:
    checkpoint: Checkpoint
    train: ImageDataset
    device: torch.device
    engine_factory: Callable[[], InfluenceEngine]
    tracin_space: str = "logits"
    tracin_params: str = "all"
    tracin_weights: str = "lr"  # lr: ηₜ, each epoch's mean learning rate (Pruthi et al.) | uniform: 1 per checkpoint
    seed: int = 0
    arch: str | None = None  # the architecture the user named (for module:callable checkpoints)
    _probs: np.ndarray | None = field(default=None, repr=False)
    _engine: InfluenceEngine | None = field(default=None, repr=False)
    # TracIn's squared gradient norms per (space, parameters — '' at the logits —, epoch), and each epoch
    # checkpoint's predicted classes: what the scores read from a checkpoint, kept; not its [n, K] probabilities
    _tracin_norms: dict[tuple[str, str, int], np.ndarray] = field(default_factory=dict, repr=False)
    _predicted: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _run: list[tuple[Path, CheckpointMeta]] | None = field(default=None, repr=False)
    _dynamics: Dynamics | None = field(default=None, repr=False)
    _problems: dict[str, str | None] = field(default_factory=dict, repr=False)
    _early: EarlyLearning | None = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)

    @property
    def labels(self) -> np.ndarray:
        return self.train.labels.numpy()

    @property
    def probs(self) -> np.ndarray:
        if self._probs is None:
            self._probs = predict_proba(self.checkpoint.model, self.train, self.device)
        return self._probs

    @property
    def engine(self) -> InfluenceEngine:
        if self._engine is None:
            self._engine = self.engine_factory()
        return self._engine

    @property
    def run(self) -> list[tuple[Path, CheckpointMeta]]:
        """The epoch checkpoints of this run with their metadata (:func:`run_metas`), read once."""
        if self._run is None:
            self._run, notes = run_metas(self.checkpoint, self.arch)
            self.notes.extend(f"epoch checkpoints: {n}" for n in notes)
        return self._run

    @property
    def dynamics(self) -> Dynamics:
        """The run's training-dynamics records (every epoch checkpoint of the run, in order), read once."""
        if self._dynamics is None:
            paths, metas = [p for p, _ in self.run], [m for _, m in self.run]
            if not all(m.dynamics for m in metas):
                raise UserError(f"no training dynamics beside {self.checkpoint.path}: the aum, forgetting and avg_loss "
                                "scores need the epoch-E.pt checkpoints and logits that `trainfluence train` writes "
                                "(retrain, or choose other --score names)")
            n, k = len(self.train), self.train.num_classes
            pixels = images_fingerprint(self.train.images)
            logits = np.stack([load_record(p.parent, m.dynamics, n, k, pixels) for p, m in zip(paths, metas)])
            self._dynamics = Dynamics(logits, self.labels)
        return self._dynamics

    def is_final(self, epoch: int) -> bool:
        """Whether the run's checkpoint after ``epoch`` (0-based, as in :attr:`run`) holds the final model's weights:
        it is that file, or the same run's same epoch (``train`` writes ``final.pt`` from the last epoch's model)."""
        path, meta = self.run[epoch]
        final = self.checkpoint.meta
        return path == self.checkpoint.path or (meta.run_id == final.run_id and meta.epoch == final.epoch)

    def model_at(self, epoch: int) -> torch.nn.Module:
        """The model of the run's checkpoint after ``epoch``: the final model's own when :meth:`is_final`."""
        if self.is_final(epoch):
            return self.checkpoint.model
        return load_checkpoint(self.run[epoch][0], device=self.device, arch=self.arch).model

    def predicted_at(self, epoch: int) -> np.ndarray:
        """[n] classes the run's checkpoint after ``epoch`` predicts for the training set.  One inference pass per
        checkpoint for everything read from its probabilities (kept: these classes and TracIn's norms at the
        logits), none for the final model's (:attr:`probs`)."""
        if epoch not in self._predicted:
            probs = self.probs if self.is_final(epoch) else predict_proba(self.model_at(epoch), self.train, self.device)
            self._predicted[epoch] = probs.argmax(1)
            self._tracin_norms["logits", "", epoch] = output_gradient_norms(probs, self.labels)
        return self._predicted[epoch]

    @property
    def early_learning(self) -> EarlyLearning:
        """:class:`EarlyLearning` from the training dynamics (computed once)."""
        if self._early is None:
            self._early = early_learning(self.labels, self.dynamics.probabilities(), self.probs)
        return self._early

    @property
    def dynamics_problem(self) -> str | None:
        """Why the training dynamics cannot be read (None when they can); tried once."""
        if "dynamics" not in self._problems:
            try:
                self.dynamics
                self._problems["dynamics"] = None
            except UserError as exc:
                self._problems["dynamics"] = str(exc)
        return self._problems["dynamics"]

    @property
    def has_dynamics(self) -> bool:
        return self.dynamics_problem is None

    @property
    def engine_used(self) -> InfluenceEngine | None:
        """The engine, if a score needed it (None otherwise: nothing to report about it)."""
        return self._engine


def _self_influence(ctx: AuditContext) -> np.ndarray:
    return ctx.engine.self_influence()


def run_metas(ckpt: Checkpoint, arch: str | None = None) -> tuple[list[tuple[Path, CheckpointMeta]], list[str]]:
    """The epoch checkpoints of ``ckpt``'s own run (same run id) beside it with their metadata, each file read
    once, and notes on what was left out.  ``arch``: the architecture the user named (module:callable runs)."""
    folder = ckpt.path.parent
    everything = [(p, ckpt.meta if p == ckpt.path else load_checkpoint(p, arch=arch).meta) for p in epoch_checkpoints(folder)]
    mine = [(p, m) for p, m in everything if m.run_id == ckpt.meta.run_id]
    notes = []
    if len(mine) < len(everything):
        others = sorted(set(p.name for p, _ in everything) - set(p.name for p, _ in mine))
        notes.append(f"left out {', '.join(others)} (another run wrote them into {folder})")
    if not mine:
        notes.append(f"no epoch-E.pt checkpoints of this run beside {ckpt.path}; used that checkpoint alone")
        mine = [(ckpt.path, ckpt.meta)]
    return mine, notes


def _tracin(ctx: AuditContext, until: int | None = None) -> np.ndarray:
    """TracIn over the run's checkpoints, or over those after epochs 0 … ``until`` (0-based) only; each
    checkpoint's norms computed once per context."""
    epochs = range(len(ctx.run) if until is None else until + 1)
    space = ctx.tracin_space
    key = (space, ctx.tracin_params if space == "params" else "")
    for e in bar([e for e in epochs if (*key, e) not in ctx._tracin_norms], desc=f"tracin ({space})", unit="ckpt"):
        if space == "logits":
            ctx.predicted_at(e)  # keeps the norms
        else:
            ctx._tracin_norms[(*key, e)] = squared_gradient_norms(ctx.model_at(e), ctx.train, space, ctx.tracin_params,
                                                                  ctx.device)
    norms = np.stack([ctx._tracin_norms[(*key, e)] for e in epochs])
    lrs = np.array([float(ctx.run[e][1].optimizer.get("lr", 1.0)) for e in epochs])
    return tracin_score(norms, lrs if ctx.tracin_weights == "lr" else np.ones_like(lrs))


#: ``fused``: the signals averaged when the final model has not memorised the flagged labels (the final model's
#: margin, AUM over every epoch), and when it has (AUM and TracIn, each over the epochs before memorisation set in)
FUSED_FINAL = ("margin", "aum")
FUSED_MEMORISED = ("aum", "tracin")
#: memorised since the least memorised epoch t: the share of the labels flagged at t that the final model predicts,
#: minus the share epoch t's checkpoint already predicted; at or above this the final model counts as memorised
MEMORISED = 0.25
#: memorisation sets in at the first epoch after t whose checkpoint predicts this much more of that share than t's
ONSET = 0.10

#: the signals ``fused`` reads over the first epochs only: name → f(context, last epoch read, 0-based)
UNTIL: dict[str, Callable[[AuditContext, int], np.ndarray]] = {
    "aum": lambda ctx, e: -ctx.dynamics.until(e).aum(),
    "tracin": _tracin,
}


def _fused(ctx: AuditContext) -> np.ndarray:
    problem = ctx.dynamics_problem
    if problem is not None:
        note = f"fused: ranked by tracin alone, without training dynamics ({problem})"
        if note not in ctx.notes:
            ctx.notes.append(note)
        return rank_average(SCORES["tracin"](ctx))
    el = ctx.early_learning

    def share(epoch: int) -> float:
        return el.predicted_share(ctx.labels, ctx.predicted_at(epoch))

    known, last = fused_epochs(el, share, len(ctx.run) - 1)
    note = (f"fused: of the {int(el.estimate.flagged.sum())} labels the training dynamics flag at epoch {el.epoch + 1} "
            f"(the least memorised), that epoch's checkpoint predicts {known:.0%} and the final model {el.memorised:.0%} — ")
    if last is None:
        names = FUSED_FINAL
        note += "it has not memorised them since: ranked by " + " + ".join(names)
        scores = [SCORES[name](ctx) for name in names]
    else:
        names = FUSED_MEMORISED
        rose = (f" (epoch {last + 2}'s checkpoint predicts {share(last + 1):.0%}, {ONSET * 100:.0f} points or more above epoch "
                f"{el.epoch + 1}'s)" if last + 1 < len(ctx.run) else "")
        note += (f"it memorised them since{rose}: ranked by " + " + ".join(names) + f" over epochs 1–{last + 1}, "
                 "before it memorised")
        scores = [UNTIL[name](ctx, last) for name in names]
    if note not in ctx.notes:
        ctx.notes.append(note)
    return rank_average(*scores)


SCORES: dict[str, Callable[[AuditContext], np.ndarray]] = {
    "fused": _fused,
    "aum": lambda ctx: -ctx.dynamics.aum(),
    "forgetting": lambda ctx: ctx.dynamics.forgetting(),
    "avg_loss": lambda ctx: ctx.dynamics.avg_loss(),
    "tracin": _tracin,
    "self_influence": _self_influence,
    "loss": lambda ctx: loss_score(ctx.probs, ctx.labels),
    "margin": lambda ctx: margin_score(ctx.probs, ctx.labels),
    "random": lambda ctx: random_score(len(ctx.train), ctx.seed),
}
assert tuple(SCORES) == SCORE_NAMES, "settings.audit.SCORE_NAMES names the registry"


def relabel_self_influence(engine: InfluenceEngine, indices: np.ndarray, num_classes: int) -> np.ndarray:
    """[m, K]: self-influence of each training example if it carried each label c (to suggest the least
    surprising one)."""
    out = np.empty((len(indices), num_classes))
    for c in range(num_classes):
        out[:, c] = engine.self_influence(indices, labels=torch.full((len(indices),), c, dtype=torch.long))
    return out


__all__ = ["FUSED_FINAL", "FUSED_MEMORISED", "MEMORISED", "ONSET", "UNTIL", "AuditContext", "EarlyLearning", "SCORES",
           "early_learning", "fused_epochs", "fused_names", "loss_score", "margin_score", "memorisation_onset", "output_gradient_norms",
           "random_score", "rank_average", "relabel_self_influence", "run_metas", "squared_gradient_norms",
           "tracin_score"]
