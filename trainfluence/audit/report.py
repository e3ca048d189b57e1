"""Audit outputs: ``suspects.csv``, ``metrics.json``, plots and ``index.html`` with thumbnails."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..data import ImageDataset
from ..report import html
from ..report.csvfile import write_csv as write_rows
from ..report.figures import plt, save_figure, save_thumbnail
from .metrics import recall_curve, roc_curve
from .review import mark_text


def write_csv(path: Path, order: np.ndarray, train: ImageDataset, scores: dict[str, np.ndarray], suggested: np.ndarray,
              suggested_prob: np.ndarray, si_suggested: dict[int, int], truth: np.ndarray | None, cut: int) -> None:
    """Every example in ranking order; ``within_cut`` = 1 for the first ``cut`` (the estimated number of wrong
    labels: the suggested review)."""
    names = train.classes
    head = ["rank", "index", *(["path"] if train.paths is not None else []), "within_cut", "given_label", "suggested_label",
            "suggested_probability", "self_influence_label", *scores,
            *(["is_flipped", "original_label"] if truth is not None else [])]
    labels = train.labels.numpy()

    def rows():
        for rank, i in enumerate(order, start=1):
            row = [rank, int(i), *([train.paths[i]] if train.paths is not None else []), int(rank <= cut), names[labels[i]],
                   names[suggested[i]], f"{suggested_prob[i]:.6f}",
                   names[si_suggested[int(i)]] if int(i) in si_suggested else "",
                   *(f"{scores[s][i]:.8g}" for s in scores)]
            if truth is not None:
                row += [int(truth[i] != labels[i]), names[truth[i]]]
            yield row

    write_rows(path, head, rows())


def plots(out: Path, scores: dict[str, np.ndarray], flipped: np.ndarray, cut: int) -> list[str]:
    files = []
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, s in scores.items():
        x, y = recall_curve(s, flipped)
        ax.plot(100 * x, y, label=name)
    ax.plot([0, 100], [0, 1], "k:", label="random (diagonal)")
    ax.axvline(100 * flipped.mean(), color="grey", lw=0.8, ls="--", label="true noise rate")
    if cut:  # 0: the estimate was refused, no cut
        ax.axvline(100 * cut / len(flipped), color="tab:red", lw=0.8, ls=":", label="estimated (suggested cut)")
    ax.set_xlabel("% of training set inspected (in score order)")
    ax.set_ylabel("recall of flipped labels")
    ax.set_xlim(0, min(100, max(40, 150 * max(flipped.mean(), cut / len(flipped)))))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out / "recall_vs_inspected.png")
    files.append("recall_vs_inspected.png")
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, s in scores.items():
        fpr, tpr = roc_curve(s, flipped)
        ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], "k:")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out / "roc.png")
    files.append("roc.png")
    return files


def thumb(out: Path, train: ImageDataset, i: int) -> str:
    rel = f"thumbs/train-{int(i)}.png"
    if not (out / rel).exists():
        (out / "thumbs").mkdir(exist_ok=True)
        save_thumbnail(train.images[int(i)], out / rel)
    return rel


def write_html(out: Path, report: dict[str, Any], train: ImageDataset, suspects: list[dict[str, Any]],
               related: dict[int, dict[str, list[dict[str, Any]]]], plot_files: list[str],
               marks: dict[int, dict[str, Any]]) -> None:
    esc = html.esc
    rank_by = report["rank_by"]
    parts = [f"<h1>Mislabel audit: {esc(train.config.spec)} ({len(train)} training images)</h1>",
             f"<p class='muted'>Ranked by <b>{esc(rank_by)}</b>. Scores: higher = more suspicious. "
             f"{esc(report.get('truth_note', ''))}</p>"]
    parts += [f"<p class='muted'>note: {esc(note)}</p>" for note in report.get("notes", [])]
    est = report["noise_estimate"]
    true_rate = f" (planted: {est['true_rate']:.1%})" if "true_rate" in est else ""
    if est.get("refusal"):
        parts.append(f"<h2>How many to review</h2><p><b>Not estimated</b>{esc(true_rate)}: {esc(est['refusal'])}. "
                     f"{esc(est['method'])} on the {esc(est['probabilities'])} probabilities.</p>")
    else:
        parts.append(f"<h2>How many to review</h2><p>Estimated noise rate <b>{est['rate']:.1%}</b>{esc(true_rate)}: "
                     f"review the top <b>{est['count']}</b> of the ranking (the suggested cut, column within_cut of "
                     f"suspects.csv). {esc(est['method'])} on the {esc(est['probabilities'])} probabilities.</p>")
    if est["top_pairs"]:
        parts.append("<p>Most likely confusions (given label → true label):</p>" + html.table(
            ["given", "likely true", "examples", "share of the given class"],
            [[p["given"], p["true"], p["examples"], f"{p['share_of_given']:.1%}"] for p in est["top_pairs"]]))
    acc = report.get("suggestion_accuracy")
    if acc and acc["suggested_is_original"] is not None:
        parts.append(f"<p>Suggested labels: for {acc['flipped_in_cut']} planted flips within the cut, the suggestion is "
                     f"the original label for <b>{acc['suggested_is_original']:.1%}</b> (all flips: {acc['all_flipped']:.1%}).</p>")
    metrics = report.get("metrics")
    if metrics:
        rows = [[name, m["roc_auc"], m["recall_at_10pct"], m["average_precision"], m["f1_at_num_flipped"]]
                for name, m in metrics.items()]
        parts.append(html.table(["score", "ROC AUC", "recall at 10% inspected", "average precision", "F1 at #flipped"], rows))
    parts.append(f"<h2>Top {len(suspects)} suspects</h2><div class='grid'>")
    for s in suspects:
        if est["count"] and s["rank"] == est["count"] + 1:
            parts.append(f"<div class='cut'>suggested cut: the {est['count']} above are the estimated wrong labels</div>")
        flip = " flip" if s.get("is_flipped") else ""
        note = " <span class='bad'>planted flip</span>" if s.get("is_flipped") else ""
        si = f"<br>self-influence: {esc(s['self_influence_label'])}" if s.get("self_influence_label") else ""
        where = f"<br><span class='muted' title='{esc(s['path'])}'>{esc(Path(s['path']).name)}</span>" if "path" in s else ""
        parts.append(f"<div class='card{flip}'>{html.img(thumb(out, train, s['index']), 'training image ' + str(s['index']))}"
                     f"<br>#{esc(s['rank'])} · image {esc(s['index'])}{note}{where}<br>{esc(s['given_label'])} → "
                     f"<b>{esc(s['suggested_label'])}</b> ({s['suggested_probability']:.2f}){si}"
                     f"<br><span class='muted'>{esc(rank_by)} {s['score']:.3g}</span></div>")
    parts.append("</div>")
    if related:
        parts.append("<h2>Why: the training images that most help and most hurt each top suspect's given label</h2>")
        for i, rel in related.items():
            parts.append(f"<h3>Image {esc(i)} labelled {esc(train.classes[int(train.labels[i])])}</h3>")
            for kind in ("helpful", "harmful"):
                cells = "".join(f"<div class='card small'>{html.img(thumb(out, train, e['index']), 'training image ' + str(e['index']))}"
                                f"<br>{esc(e['index'])}: {esc(e['label_name'])}"
                                + (f"<br><span class='muted'>{esc(Path(e['path']).name)}</span>" if "path" in e else "")
                                + (f"<br><span class='bad'>{esc(mark_text(marks.get(e['index'])))}</span>"
                                   if e["index"] in marks else "")
                                + f"<br>{e['score']:.3g}</div>" for e in rel[kind])
                parts.append(f"<div class='row'><b style='width:70px'>{esc(kind)}</b>{cells}</div>")
    if plot_files:
        parts.append("<h2>Detection curves</h2>" + "".join(html.img(p, p, "figure") for p in plot_files))
    fix = report.get("fix")
    if fix:
        rows = [[name, e["test_accuracy_after"], e["labels_changed"], e.get("flipped_among_chosen", ""), e.get("labels_restored", "")]
                for name, e in fix["methods"].items()]
        parts.append(f"<h2>Fixing {fix['k']} labels and retraining</h2><p>test accuracy before: {fix['test_accuracy_before']:.4f}</p>"
                     + html.table(["chosen by", "test accuracy after", "labels changed", "flipped among chosen", "labels restored"], rows))
    parts.append(f"<p class='muted'>{html.link('suspects.csv', 'suspects.csv')} · {html.link('metrics.json', 'metrics.json')}</p>")
    html.write_page(out / "index.html", "trainfluence audit", "\n".join(parts))
