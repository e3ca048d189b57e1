"""The report phase of scripts/bench_mislabel.py: score every saved cell with trainfluence's own functions.

Also usable alone to explore combinations: ``python scripts/bench_mislabel_report.py --candidates``.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from trainfluence.audit.estimate import estimate_noise, suggest_labels
from trainfluence.audit.metrics import precision_recall_f1_at_k, roc_auc
from trainfluence.audit.scores import (FUSED_FINAL, FUSED_MEMORISED, MEMORISED, ONSET, early_learning, fused_epochs,
                                       loss_score, margin_score, output_gradient_norms, random_score, rank_average,
                                       tracin_score)
from trainfluence.dynamics import Dynamics

KINDS = ("uniform", "asymmetric", "instance")
ROWS = ("fused", "aum", "forgetting", "avg_loss", "tracin", "self_influence", "loss", "margin", "cleanlab", "random")


def load_cell(path: Path) -> dict:
    d = np.load(path, allow_pickle=False)
    return {k: d[k] for k in d.files}


def early_shares(c: dict, dyn: Dynamics):
    """The cell's :class:`EarlyLearning` and fused's branch from the saved checkpoints' probabilities
    (:func:`fused_epochs`: the share epoch t's checkpoint predicts, and the last epoch fused reads or None)."""
    labels, probs = c["labels"], c["checkpoint_probs"]
    el = early_learning(labels, dyn.probabilities(), probs[-1].astype(np.float64))
    return (el, *fused_epochs(el, lambda e: el.predicted_share(labels, probs[e].argmax(1)), len(probs) - 1))


def cell_scores(c: dict, dyn: Dynamics, last: int | None) -> dict[str, np.ndarray]:
    """Every score of a cell, given its dynamics and fused's last epoch (:func:`early_shares`)."""
    labels = c["labels"]
    final = c["checkpoint_probs"][-1].astype(np.float64)
    norms = np.stack([output_gradient_norms(p.astype(np.float64), labels) for p in c["checkpoint_probs"]])
    s = {"aum": -dyn.aum(), "forgetting": dyn.forgetting(), "avg_loss": dyn.avg_loss(),
         "tracin": tracin_score(norms, c["lrs"]), "self_influence": c["self_influence"],
         "loss": loss_score(final, labels), "margin": margin_score(final, labels),
         "random": random_score(len(labels), 0)}
    if "cv_probs" in c:
        from cleanlab.rank import get_label_quality_scores

        s["cleanlab"] = -get_label_quality_scores(labels, c["cv_probs"], method="self_confidence")
    if last is None:
        s["fused"] = rank_average(*(s[n] for n in FUSED_FINAL))
    else:  # the audit's UNTIL signals, from the saved arrays
        until = {"aum": -dyn.until(last).aum(), "tracin": tracin_score(norms[: last + 1], c["lrs"][: last + 1])}
        s["fused"] = rank_average(*(until[n] for n in FUSED_MEMORISED))
    return s


def cell_metrics(c: dict) -> dict:
    flipped, labels = c["labels"] != c["clean"], c["labels"]
    dyn = Dynamics(c["logits"].astype(np.float32), labels)
    el, known, last = early_shares(c, dyn)  # once per cell: the scores' fused and the report's shares
    scores = cell_scores(c, dyn, last)
    out = {"scores": {name: {"recall_at_budget": precision_recall_f1_at_k(s, flipped)["recall"],
                             "roc_auc": roc_auc(s, flipped)} for name, s in scores.items()}}
    sources = {"dynamics, mean over epochs": dyn.mean_probs(), "final model": c["checkpoint_probs"][-1].astype(np.float64),
               "dynamics, first epoch": dyn.probabilities()[0]}
    if "cv_probs" in c:
        sources["out-of-fold (CV)"] = c["cv_probs"]
    out["true_rate"] = float(flipped.mean())
    out["estimates"] = {k: estimate_noise(labels, p).rate for k, p in sources.items()}
    out["known_at_t"], out["onset"] = known, last
    out["estimates"]["least memorised epoch (default)"] = el.estimate.rate
    out["memorised"] = el.memorised
    per_epoch = el.rates
    per_ckpt = [estimate_noise(labels, p.astype(np.float64)).rate for p in c["checkpoint_probs"]]
    out["estimates"]["max over epochs ≥ 2 (minibatch)"] = max(per_epoch[1:] or per_epoch)
    out["estimates"]["max over checkpoints"] = max(per_ckpt)
    out["estimates"]["first checkpoint"] = per_ckpt[0]
    if "cv_probs" in c:
        from cleanlab.count import num_label_issues

        out["estimates"]["cleanlab num_label_issues (CV)"] = num_label_issues(labels, c["cv_probs"]) / len(labels)
    # suggested labels for the flipped examples among the default ranking's top (true budget)
    top = np.argsort(-scores["fused"], kind="stable")[: int(flipped.sum())]
    hit = top[flipped[top]]
    out["suggest"] = {"dynamics, mean over epochs (default)": float((suggest_labels(labels, sources["dynamics, mean over epochs"])[hit] == c["clean"][hit]).mean()),
                      "final model": float((suggest_labels(labels, sources["final model"])[hit] == c["clean"][hit]).mean())}
    out["suggest"]["epoch of the estimate"] = float((suggest_labels(labels, dyn.probabilities()[el.epoch])[hit] == c["clean"][hit]).mean())
    if "cv_probs" in c:
        out["suggest"]["out-of-fold (CV)"] = float((suggest_labels(labels, c["cv_probs"])[hit] == c["clean"][hit]).mean())
    out["meta"] = json.loads(str(c["meta"]))
    return out


def _cells(raw: Path) -> dict[tuple[str, int, int], list[Path]]:
    groups: dict[tuple[str, int, int], list[Path]] = {}
    for p in sorted(raw.glob("*.npz")):
        kind, rate, epochs, _ = p.stem.split("-")
        groups.setdefault((kind, int(rate), int(epochs[1:])), []).append(p)
    return groups


def _fmt(values: list[float], digits: int = 3) -> str:
    v = np.array(values)
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}" if len(v) > 1 else f"{v.mean():.{digits}f}"


def report(args) -> str:
    groups = _cells(args.raw)
    results = {key: [cell_metrics(load_cell(p)) for p in paths] for key, paths in groups.items()}
    keys = sorted(results, key=lambda k: (KINDS.index(k[0]), k[1], k[2]))
    seeds = sorted({len(v) for v in results.values()})
    seed_ids = sorted({int(p.stem.rsplit("-s", 1)[1]) for paths in groups.values() for p in paths})
    per_cell = ", ".join(f"{k}{r}% {e}ep: {len(results[(k, r, e)])}" for k, r, e in keys) if len(seeds) > 1 else ""
    head = [f"### Mislabel detection across noise regimes: MNIST first {args.train_size:,} training images, default CNN",
            "",
            f"Each cell: mean ± std over {'/'.join(map(str, seeds))} noise seeds (seeds "
            f"{', '.join(map(str, seed_ids))} in that order"
            + (f"; seeds per cell — {per_cell}" if per_cell else "") + "). "
            "Recall at budget: the share of the flipped labels among the top k = (number flipped) of the ranking. "
            f"cleanlab: self-confidence on out-of-fold probabilities ({args.folds}-fold, {args.cv_epochs}-epoch models, "
            "the same in both epoch columns). self_influence: last layer, exact solve, damping 0.01. "
            f"fused (the audit's default ranking) = rank average of {' + '.join(FUSED_FINAL)} when, of the labels "
            "confident learning flags at the least memorised epoch t, the final model predicts a share less than "
            f"{MEMORISED * 100:.0f} points above the share t's checkpoint predicts, else of {' + '.join(FUSED_MEMORISED)} over the "
            f"epochs before memorisation set in: up to the epoch before the first after t whose checkpoint predicts a "
            f"share {ONSET * 100:.0f} points or more above t's. tracin: over every epoch.", ""]
    cols = [f"{k}{r}% {e}ep" for k, r, e in keys]
    lines = ["**Recall at the true noise budget** (higher is better; **bold**: best in the column)", "",
             "| score | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    means = {name: [np.mean([m["scores"][name]["recall_at_budget"] for m in results[k]]) if name in results[k][0]["scores"] else np.nan
                    for k in keys] for name in ROWS}
    best = np.nanmax(np.array([means[n] for n in ROWS if n != "random"]), axis=0)
    for name in ROWS:
        cells = []
        for j, k in enumerate(keys):
            if name not in results[k][0]["scores"]:
                cells.append("—")
                continue
            txt = _fmt([m["scores"][name]["recall_at_budget"] for m in results[k]])
            cells.append(f"**{txt}**" if abs(means[name][j] - best[j]) < 5e-4 else txt)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "**ROC AUC**", "", "| score | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name in ROWS:
        if name not in results[keys[0]][0]["scores"]:
            continue
        lines.append(f"| {name} | " + " | ".join(_fmt([m["scores"][name]["roc_auc"] for m in results[k]], 4) for k in keys) + " |")
    sources = list(results[keys[0]][0]["estimates"])
    lines += ["", "**Estimated noise rate** (confident learning with each source of probabilities; true rate in the header)",
              "", "| probabilities | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols),
              "| true rate | " + " | ".join(_fmt([m["true_rate"] for m in results[k]]) for k in keys) + " |"]
    for src in sources:
        lines.append(f"| {src} | " + " | ".join(_fmt([m["estimates"][src] for m in results[k]]) for k in keys) + " |")
    sug = list(results[keys[0]][0]["suggest"])
    lines += ["", "**Suggested-label accuracy** (flipped labels found in the default ranking's top budget: share whose "
              "suggestion is the original label)", "", "| suggestion from | " + " | ".join(cols) + " |",
              "|---|" + "---|" * len(cols)]
    for src in sug:
        lines.append(f"| {src} | " + " | ".join(_fmt([m["suggest"][src] for m in results[k]]) for k in keys) + " |")
    acc = [f"{k}{r}% {e}ep: train {np.mean([m['meta']['train_accuracy'] for m in results[(k, r, e)]]):.3f} / test "
           f"{np.mean([m['meta']['test_accuracy'] for m in results[(k, r, e)]]):.3f}" for k, r, e in keys]
    lines += ["", "Accuracy on the noisy training labels / clean test labels: " + "; ".join(acc) + "."]
    mem = [f"{k}{r}% {e}ep: " + ", ".join(f"{m['known_at_t']:.2f} → {m['memorised']:.2f}"
                                         + (f" (epochs 1–{m['onset'] + 1})" if m["onset"] is not None else "")
                                         for m in results[(k, r, e)]) for k, r, e in keys]
    lines += ["", "Share of the labels flagged at the least memorised epoch t that t's checkpoint → the final model "
              "predicts, per seed (fused's branch: the difference against the threshold " f"{MEMORISED}; when "
              "memorised, the epochs fused read): " + "; ".join(mem) + "."]
    return "\n".join(head + lines)


def candidates(raw: Path) -> None:
    """Recall at budget of rank averages of every 2- and 3-subset of the signals, per cell (to choose FUSED)."""
    groups = _cells(raw)
    per, flips = {}, {}
    for key, paths in groups.items():
        for path in paths:  # each cell read once
            c = load_cell(path)
            dyn = Dynamics(c["logits"].astype(np.float32), c["labels"])
            per.setdefault(key, []).append(cell_scores(c, dyn, early_shares(c, dyn)[2]))
            flips.setdefault(key, []).append(c["labels"] != c["clean"])
    names = ["aum", "forgetting", "avg_loss", "tracin", "self_influence", "loss", "margin"]
    combos = [(n,) for n in names + ["cleanlab", "fused"]] + list(itertools.combinations(names, 2)) + list(itertools.combinations(names, 3))
    table = []
    for combo in combos:
        row = []
        for key in sorted(per):
            row.append(np.mean([precision_recall_f1_at_k(rank_average(*(s[n] for n in combo)), f)["recall"]
                                for s, f in zip(per[key], flips[key])]))
        table.append((combo, row))
    best = np.max([r for _, r in table], axis=0)
    print("cells:", [f"{k}{r}e{e}" for k, r, e in sorted(per)])
    for combo, row in sorted(table, key=lambda t: -min(np.array(t[1]) - best)):
        print(f"{'+'.join(combo):35s} worst gap {min(np.array(row) - best):+.4f}  " + " ".join(f"{v:.3f}" for v in row))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--raw", type=Path, default=Path("runs/bench_mislabel"))
    ap.add_argument("--candidates", action="store_true")
    a = ap.parse_args()
    if a.candidates:
        candidates(a.raw)
