"""The mislabel audit: rank training examples by how likely their label is wrong, suggest labels, measure
against planted noise, optionally fix and retrain, and write CSV, JSON and HTML.

    report = run_audit(checkpoint, train_set, test_set, AuditSettings(), engine_factory, out_dir, device)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..checkpoint import Checkpoint
from ..checks import FIX_SOLVE, require_finite
from ..data import ImageDataset
from ..data.noise import write_noise_record
from ..files import write_json
from ..influence import InfluenceEngine
from ..progress import write
from ..settings import to_dict, validate
from ..settings.audit import AuditSettings
from .fix import fix_experiment
from .metrics import all_metrics, ranking
from .review import Review, label_marks, review
from .report import plots, write_csv, write_html
from .scores import SCORES, AuditContext, relabel_self_influence

__all__ = ["AuditSettings", "Review", "label_marks", "run_audit"]


def run_audit(ckpt: Checkpoint, train: ImageDataset, test: ImageDataset, settings: AuditSettings,
              engine_factory: Callable[[], InfluenceEngine], out: Path, device: torch.device,
              arch: str | None = None) -> dict[str, Any]:
    validate(settings)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    ctx = AuditContext(ckpt, train, device, engine_factory, settings.tracin_space, settings.tracin_params,
                       settings.tracin_weights, settings.seed, arch)

    t0 = time.perf_counter()
    ctx.probs  # the final model's probabilities, computed once (timed apart from the scores)
    timings["predict_s"] = time.perf_counter() - t0
    scores: dict[str, np.ndarray] = {}
    for name in settings.computed_scores:
        t0 = time.perf_counter()
        scores[name] = require_finite(np.asarray(SCORES[name](ctx), dtype=np.float64), f"the {name} scores", FIX_SOLVE)
        timings[f"score_{name}_s"] = time.perf_counter() - t0
        write(f"audit: scored {len(train)} examples by {name} in {timings[f'score_{name}_s']:.1f} s")
    rank_by = settings.ranking_score
    t0 = time.perf_counter()
    rev = review(ctx, scores[rank_by])  # the ranking, the suggested cut and the suggested labels
    order, estimate, suggested, suggested_prob = rev.order, rev.estimate, rev.suggested, rev.suggested_prob
    top = order[: min(settings.top, len(order))]
    si_table = relabel_self_influence(ctx.engine, top, train.num_classes)  # the least self-influential label
    si_suggested = {int(i): int(c) for i, c in zip(top, si_table.argmin(1))}
    timings["suggest_s"] = time.perf_counter() - t0
    write(f"audit: noise rate not estimated from the {rev.probabilities}: {estimate.refusal}" if estimate.refusal else
          f"audit: estimated noise rate {estimate.rate:.1%} ({estimate.count} labels) from the {rev.probabilities}")

    t0 = time.perf_counter()
    related: dict[int, dict[str, list[dict[str, Any]]]] = {}
    detail = top[: settings.detail]
    if len(detail):
        found = ctx.engine.top_k(train.tensors(detail), min(settings.related_k + 1, len(train)))
        for row, i in enumerate(detail):
            related[int(i)] = {kind: [{**train.describe_item(j), "label_name": train.classes[int(train.labels[j])],
                                       "score": float(s)}
                                      for j, s in zip(idx[row], sc[row]) if j != i][: settings.related_k]
                               for kind, idx, sc in (("helpful", found.helpful_index, found.helpful_score),
                                                     ("harmful", found.harmful_index, found.harmful_score))}
    timings["related_s"] = time.perf_counter() - t0

    truth = train.clean_labels.numpy() if train.clean_labels is not None else None
    flipped = (truth != train.labels.numpy()) if truth is not None else None
    engine = ctx.engine_used
    report: dict[str, Any] = {"rank_by": rank_by, "n": len(train), "settings": to_dict(settings),
                              "dataset": to_dict(train.config), "checkpoint": str(ckpt.path),
                              "engine": engine.describe() if engine is not None else None,
                              "damping_used": engine.damping if engine is not None else None,
                              "solves": [to_dict(r) for r in engine.reports] if engine is not None else []}
    if engine is not None and engine.build_report is not None:
        report["gradient_store"] = "reused (no gradient pass)" if engine.build_report.reused else \
            f"built {engine.build_report.built_chunks} chunk(s)"
    report["noise_estimate"] = {"rate": estimate.rate, "count": estimate.count, "refusal": estimate.refusal,
                                "probabilities": rev.probabilities,
                                "top_pairs": estimate.top_pairs(train.classes),
                                "method": "confident learning (per-class thresholds, calibrated confident joint)"}
    if flipped is not None:
        report["num_flipped"] = int(flipped.sum())
        report["metrics"] = {name: all_metrics(s, flipped) for name, s in scores.items()}
        cut = order[: estimate.count]
        found = cut[flipped[cut]]
        report["noise_estimate"]["true_rate"] = float(flipped.mean())
        report["suggestion_accuracy"] = {
            "flipped_in_cut": int(len(found)),
            "suggested_is_original": float((suggested[found] == truth[found]).mean()) if len(found) else None,
            "all_flipped": float((suggested[flipped] == truth[flipped]).mean())}
        report["truth_note"] = f"{int(flipped.sum())} labels were flipped on purpose (planted noise): red frames mark them."
    else:
        report["truth_note"] = "No planted noise: no detection metrics (pass --label-noise to measure them)."

    if settings.fix:
        t0 = time.perf_counter()
        k = min(settings.fix, len(train))
        rng = np.random.default_rng(settings.seed)
        choices = {f"ranking ({rank_by})": order[:k], "random": rng.choice(len(train), size=k, replace=False)}
        choices["loss"] = ranking(scores["loss"] if "loss" in scores else SCORES["loss"](ctx))[:k]
        report["fix"] = fix_experiment(ckpt, train, test, choices, suggested, device, arch)
        timings["fix_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    write_csv(out / "suspects.csv", order, train, scores, suggested, suggested_prob, si_suggested, truth, estimate.count)
    plot_files = plots(out, scores, flipped, estimate.count) if flipped is not None else []
    suspects = [{"rank": r + 1, **train.describe_item(i), "given_label": train.classes[int(train.labels[i])],
                 "suggested_label": train.classes[int(suggested[i])], "suggested_probability": float(suggested_prob[i]),
                 "self_influence_label": train.classes[si_suggested[int(i)]],
                 "score": float(scores[rank_by][i]), "within_cut": r < estimate.count,
                 **({"is_flipped": bool(flipped[i])} if flipped is not None else {})} for r, i in enumerate(top)]
    report["suspects"] = suspects
    report["notes"] = ctx.notes
    timings["write_s"] = time.perf_counter() - t0
    report["timings"] = timings
    write_html(out, report, train, suspects, related, plot_files, label_marks(train, rev))
    write_json(out / "metrics.json", report)
    report["review"] = rev  # not JSON (so after writing): for pages that mark training images (review.label_marks)
    write_noise_record(out, train)
    return report
