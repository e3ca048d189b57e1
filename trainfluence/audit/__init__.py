"""The mislabel audit: rank training examples by how likely their label is wrong, suggest labels, measure
against planted noise, optionally fix and retrain, and write CSV, JSON and HTML.

    report = run_audit(checkpoint, train_set, test_set, AuditSettings(), engine_factory, out_dir)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..checkpoint import Checkpoint
from ..data import ImageDataset
from ..errors import UserError
from ..influence import InfluenceEngine
from ..progress import write
from ..settings import to_dict, write_json
from .fix import fix_experiment
from .metrics import all_metrics, ranking
from .report import plots, write_csv, write_html
from .scores import DEFAULT_SCORE, SCORES, AuditContext, check_score_names, relabel_self_influence


@dataclass
class AuditSettings:
    scores: list[str] = field(default_factory=lambda: list(SCORES))  # computed and compared
    rank_by: str | None = None  # the ranking shown (default: the first of ``scores``)
    top: int = 48  # suspects shown with thumbnails and label suggestions
    detail: int = 6  # top suspects shown with their most helpful and harmful training images
    related_k: int = 5
    fix: int = 0  # relabel this many top suspects and retrain (0: skip)
    tracin_space: str = "logits"  # logits | params
    tracin_params: str = "all"
    tracin_weights: str = "lr"  # lr (ηₜ per checkpoint) | uniform
    seed: int = 0

    def validate(self) -> None:
        check_score_names(self.scores)
        if self.rank_by is not None:
            check_score_names([self.rank_by])
            if self.rank_by not in self.scores:
                self.scores.insert(0, self.rank_by)
        if self.tracin_space not in ("logits", "params"):
            raise UserError(f"unknown --tracin-space {self.tracin_space!r}: use logits or params")
        if self.tracin_weights not in ("lr", "uniform"):
            raise UserError(f"unknown --tracin-weights {self.tracin_weights!r}: use lr or uniform")
        if self.top < 1 or self.fix < 0 or self.detail < 0:
            raise UserError("--top must be positive and --fix, --detail non-negative")

    @property
    def ranking_score(self) -> str:
        return self.rank_by or (self.scores[0] if self.scores else DEFAULT_SCORE)


def run_audit(ckpt: Checkpoint, train: ImageDataset, test: ImageDataset, settings: AuditSettings,
              engine_factory: Callable[[], InfluenceEngine], out: Path, device: torch.device) -> dict[str, Any]:
    settings.validate()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    ctx = AuditContext(ckpt, train, device, engine_factory, settings.tracin_space, settings.tracin_params,
                       settings.tracin_weights, settings.seed)

    t0 = time.perf_counter()
    probs = ctx.probs
    timings["predict_s"] = time.perf_counter() - t0
    scores: dict[str, np.ndarray] = {}
    for name in settings.scores:
        t0 = time.perf_counter()
        scores[name] = np.asarray(SCORES[name](ctx), dtype=np.float64)
        timings[f"score_{name}_s"] = time.perf_counter() - t0
        write(f"audit: scored {len(train)} examples by {name} in {timings[f'score_{name}_s']:.1f} s")
    rank_by = settings.ranking_score
    order = ranking(scores[rank_by])
    top = order[: min(settings.top, len(order))]

    # suggested labels: the model's prediction, and the label that would make the example least self-influential
    t0 = time.perf_counter()
    suggested, suggested_prob = probs.argmax(1), probs.max(1)
    x_top, _ = train.tensors(top)
    si_table = relabel_self_influence(ctx.engine, x_top, train.num_classes)
    si_suggested = {int(i): int(c) for i, c in zip(top, si_table.argmin(1))}
    timings["suggest_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    related: dict[int, dict[str, list[dict[str, Any]]]] = {}
    detail = top[: settings.detail]
    if len(detail):
        found = ctx.engine.top_k(train.tensors(detail), settings.related_k + 1)
        for row, i in enumerate(detail):
            related[int(i)] = {kind: [{"index": int(j), "label_name": train.classes[int(train.labels[j])], "score": float(s)}
                                      for j, s in zip(idx[row], sc[row]) if j != i][: settings.related_k]
                               for kind, idx, sc in (("helpful", found.helpful_index, found.helpful_score),
                                                     ("harmful", found.harmful_index, found.harmful_score))}
    timings["related_s"] = time.perf_counter() - t0

    truth = train.clean_labels.numpy() if train.clean_labels is not None else None
    flipped = (truth != train.labels.numpy()) if truth is not None else None
    report: dict[str, Any] = {"rank_by": rank_by, "n": len(train), "settings": to_dict(settings),
                              "dataset": to_dict(train.config), "checkpoint": str(ckpt.path),
                              "engine": ctx._engine.settings() if ctx._engine is not None else None}
    if flipped is not None:
        report["num_flipped"] = int(flipped.sum())
        report["metrics"] = {name: all_metrics(s, flipped) for name, s in scores.items()}
        report["truth_note"] = f"{int(flipped.sum())} labels were flipped on purpose (planted noise): red frames mark them."
    else:
        report["truth_note"] = "No planted noise: no detection metrics (pass --label-noise to measure them)."

    if settings.fix:
        t0 = time.perf_counter()
        k = min(settings.fix, len(train))
        rng = np.random.default_rng(settings.seed)
        choices = {f"ranking ({rank_by})": order[:k], "random": rng.choice(len(train), size=k, replace=False)}
        choices["loss"] = ranking(scores["loss"] if "loss" in scores else SCORES["loss"](ctx))[:k]
        report["fix"] = fix_experiment(ckpt, train, test, choices, suggested, device)
        timings["fix_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    write_csv(out / "suspects.csv", order, train, scores, suggested, suggested_prob, si_suggested, truth)
    plot_files = plots(out, scores, flipped) if flipped is not None else []
    suspects = [{"rank": r + 1, "index": int(i), "given_label": train.classes[int(train.labels[i])],
                 "suggested_label": train.classes[int(suggested[i])], "suggested_probability": float(suggested_prob[i]),
                 "self_influence_label": train.classes[si_suggested[int(i)]], "score": float(scores[rank_by][i]),
                 **({"is_flipped": bool(flipped[i])} if flipped is not None else {})} for r, i in enumerate(top)]
    report["suspects"] = suspects
    report["notes"] = ctx.notes
    timings["write_s"] = time.perf_counter() - t0
    report["timings"] = timings
    write_html(out, report, train, suspects, related, plot_files)
    write_json(out / "metrics.json", report)
    if train.noise is not None:
        write_json(out / "noise.json", train.noise)
    return report
