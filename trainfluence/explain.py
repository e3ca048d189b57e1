"""Explaining test predictions by training images: the most helpful and most harmful training examples.

:func:`explain` writes ``influence.json`` (indices — and file paths, for folder datasets — labels and I_up,loss
scores of the ``top`` most helpful and harmful training images per test point, with the settings, timings and how
each solve ended), one PNG grid per test point and an ``index.html`` that shows them.  The grids draw at most
:data:`MAX_DRAWN` images per row (``influence.json`` lists all of them).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from .data import ImageDataset
from .ensemble import EnsembleEngine
from .influence import InfluenceEngine
from .removal import DIRECT_SOLVERS, newton_unsupported
from .report import html
from .files import write_json
from .audit.review import mark_text
from .report.figures import Panel, panel_grid, to_display
from .settings import to_dict
from .solvers.base import SolveReport

MAX_DRAWN = 20  # training images per row of a picture


MAGNITUDE_NOTE = ("Magnitude: removing a training image changes this test loss by about −score/n (first order). Measured "
                  "by retraining (BENCHMARKS.md): for MNIST logistic regression the actual change was 1.2× the prediction "
                  "(Pearson 0.99); for the default CNN on 100 images it was 4× (Pearson 0.88): a deep network moves further "
                  "than the first-order term says, so trust the ranking before the size of the number.")
NEWTON_NOTE = ("'With its leverage': one Newton step with the image's own curvature taken out (trainfluence.removal), "
               "which a memorised image (leverage near 1) needs. On the default CNN with 100 images (exact solve) it "
               "predicted retraining at Pearson 0.96 (actual 0.6× its prediction) where first order reached 0.88.")


def _entry(dataset: ImageDataset, index: int, score: float | None = None, n: int | None = None,
           marks: dict[int, dict[str, Any]] | None = None,
           removal: tuple[float, float] | None = None) -> dict[str, Any]:
    label = int(dataset.labels[index])
    entry: dict[str, Any] = {**dataset.describe_item(index), "label": label, "label_name": dataset.classes[label]}
    if score is not None:
        entry["score"] = float(score)
        if n:
            entry["first_order_loss_change"] = -float(score) / n
    if removal is not None:  # the Newton step with the image's own curvature taken out (trainfluence.removal)
        change, leverage = removal  # change NaN: no Newton step (leverage ≥ 1 under approximate curvature)
        entry["predicted_loss_change_if_removed"] = float(change) if np.isfinite(change) else None
        entry["leverage"] = float(leverage)
    if marks is not None:
        entry["label_check"] = marks.get(index, {})  # planted flip / audit suspect with its suggested label
    return entry


def explain(engine: InfluenceEngine | EnsembleEngine, train: ImageDataset, test: ImageDataset, indices: list[int], top: int,
            out: Path, *, pixels: bool = False, marks: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The ``top`` most helpful and harmful training images for each test index; writes JSON, PNGs and HTML into ``out``.
    With ``pixels``, each shown training image also gets its I_pert,loss map (which of its pixels, if changed,
    would move the test loss most), drawn beside it.  ``marks`` (from :func:`trainfluence.audit.label_marks`):
    planted flips and audit suspects, noted under each training image they concern."""
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    engine.build_cache()
    timings["gradient_store_s"] = time.perf_counter() - t0
    x, y = test.tensors(indices)
    t0 = time.perf_counter()
    found = engine.top_k((x, y), top)
    timings["s_test_and_search_s"] = time.perf_counter() - t0
    probs = engine.predict_proba(x)
    solver = engine.first.solver.name if isinstance(engine, EnsembleEngine) else engine.solver.name
    newton_note = newton_unsupported(solver) or ("" if solver in DIRECT_SOLVERS else
                                                 f"the removal's Newton step is computed here only with --solver exact: with "
                                                 f"{solver} it takes K iterative solves per image shown (minutes for logistic "
                                                 "regression on 5,000 MNIST images); InfluenceEngine.removal_effect computes it")
    column: dict[int, int] = {}
    if not newton_note:
        t0 = time.perf_counter()
        shown_all = np.unique(np.concatenate([found.helpful_index.ravel(), found.harmful_index.ravel()]))
        change, leverage = engine.removal_effect((x, y), shown_all)  # [tests, shown], [shown]
        column = {int(i): c for c, i in enumerate(shown_all)}
        timings["removal_effect_s"] = time.perf_counter() - t0
    s_all = engine.s_test((x, y)) if pixels else None  # solved once for every row's pixel maps
    results = []
    for row, t in enumerate(indices):
        pred = int(probs[row].argmax())

        def entries(kind_index: np.ndarray, kind_score: np.ndarray) -> list[dict[str, Any]]:
            return [_entry(train, int(i), s, len(train), marks,
                           (change[row, column[int(i)]], leverage[column[int(i)]]) if column else None)
                    for i, s in zip(kind_index[row], kind_score[row])]

        item = {
            "test": {**_entry(test, t), "prediction": pred, "prediction_name": test.classes[pred],
                     "probability": float(probs[row, pred])},
            "helpful": entries(found.helpful_index, found.helpful_score),
            "harmful": entries(found.harmful_index, found.harmful_score),
            "figure": f"explain-{t}.png",
        }
        maps = None
        if pixels:
            t0 = time.perf_counter()
            shown = [e["index"] for e in item["helpful"] + item["harmful"]]
            pert = engine.pixel_influence((x, y), shown, s_test=s_all[row]).sum(1).cpu()  # summed over channels
            maps = dict(zip(shown, pert.numpy()))
            timings["pixel_influence_s"] = timings.get("pixel_influence_s", 0.0) + time.perf_counter() - t0
            for e in item["helpful"] + item["harmful"]:
                e["pixel_influence_abs_sum"] = float(np.abs(maps[e["index"]]).sum())
        _figure(item, train, test, out / item["figure"], maps)
        results.append(item)
    report = {"settings": engine.describe(), "damping_used": engine.damping,
              "store": str(engine.store.root if engine.store else ""),
              "solves": [to_dict(r) for r in engine.reports],
              "sign": "I_up,loss: negative = helpful (upweighting lowers the test loss), positive = harmful",
              "magnitude": MAGNITUDE_NOTE, "newton_step": newton_note or NEWTON_NOTE,
              "top": top, "gradient_store": "reused" if engine.build_report and engine.build_report.reused else "built",
              "pixels": pixels, "timings": timings, "explanations": results}
    write_json(out / "influence.json", report)
    _html(report, out)
    return report


def _figure(item: dict[str, Any], train: ImageDataset, test: ImageDataset, path: Path,
            maps: dict[int, np.ndarray] | None = None) -> None:
    t = item["test"]
    head = [Panel(to_display(test.images[t["index"]]), f"test #{t['index']}\n{t['label_name']} → {t['prediction_name']}",
                  color="green" if t["label"] == t["prediction"] else "red")]
    rows, labels = [head], ["test"]
    for kind, colour in (("helpful", "green"), ("harmful", "red")):
        shown = item[kind][:MAX_DRAWN]
        rows.append([Panel(to_display(train.images[e["index"]]), f"#{e['index']} {e['label_name']}\n{e['score']:.3g}"
                           + ("\n" + mark_text(e["label_check"], sep="\n") if e.get("label_check") else ""),
                           color=colour)
                     for e in shown])
        labels.append(kind)
        if maps is not None:
            rows.append([Panel(to_display(train.images[e["index"]]) * 0.6 + 0.2, "I_pert,loss", overlay=maps[e["index"]])
                         for e in shown])
            labels.append(f"{kind} pixels")
    title = "red pixels: brightening them raises the test loss; blue: lowers it" if maps is not None else None
    if len(item["helpful"]) > MAX_DRAWN:
        title = (title + "\n" if title else "") + f"the first {MAX_DRAWN} of {len(item['helpful'])} per row (all in influence.json)"
    panel_grid(rows, path, row_labels=labels, title=title)


def _html(report: dict[str, Any], out: Path) -> None:
    parts = ["<h1>Which training images made the model predict this?</h1>",
             "<p class='muted'>With --pixels: under each training image, its I_pert,loss map — how moving each of "
             "its pixels would change this test loss (red: brighter raises it, blue: lowers it).</p>"
             if report.get("pixels") else "",
             f"<p class='muted'>{html.esc(report['magnitude'])} {html.esc(report['newton_step'])}</p>",
             f"<p class='muted'>{html.esc(report['sign'])}. Solver {html.esc(report['settings']['solver'])}, "
             f"damping {report['damping_used']:.3g}" + (" (auto)" if report["settings"]["damping"] == "auto" else "") + ".</p>"]
    approximations = [SolveReport(**r).describe() for r in report.get("solves", [])
                      if r["converged"] and "approximation" in r["details"]]
    for text in dict.fromkeys(approximations):  # once each (an ensemble's members fit alike)
        parts.append(f"<p class='muted'>{html.esc(text)}: an approximation of H, so the scores approximate the exact "
                     "influence (BENCHMARKS.md measures how closely).</p>")
    for r in report.get("solves", []):
        if not r["converged"]:
            parts.append(f"<p class='bad'>Warning: the {html.esc(r['solver'])} solve did not converge ({html.esc(r['measure'])} "
                         f"{r['value']:.3g} above its tolerance {r['tolerance']:.3g}): the rankings are approximate.</p>")
    for item in report["explanations"]:
        t = item["test"]
        parts.append(f"<h2>Test image #{html.esc(t['index'])}: label {html.esc(t['label_name'])}, "
                     f"predicted {html.esc(t['prediction_name'])} ({t['probability']:.2f})</h2>")
        parts.append(html.img(item["figure"], f"explanation of test image {t['index']}", "figure"))
        for kind in ("helpful", "harmful"):
            paths = any("path" in e for e in item[kind])
            checks = any("label_check" in e for e in item[kind])
            newton = any("leverage" in e for e in item[kind])
            rows = [[e["index"], *([e.get("path", "")] if paths else []), e["label_name"],
                     *([mark_text(e["label_check"])] if checks else []), e["score"], e["first_order_loss_change"],
                     *([e["predicted_loss_change_if_removed"], e["leverage"]] if newton else [])] for e in item[kind]]
            parts.append(f"<h3>Most {kind}</h3>" + html.table(["training index", *(["file"] if paths else []), "label",
                                                                *(["label check"] if checks else []), "I_up,loss",
                                                                "test-loss change if removed: first order",
                                                                *(["with its leverage (Newton step)", "leverage"]
                                                                  if newton else [])], rows))
    html.write_page(out / "index.html", "trainfluence explain", "\n".join(parts))

