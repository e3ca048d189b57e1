"""Mislabel-detection benchmark (issue: trainfluence audit).

MNIST, first 10,000 training images, 10% of labels flipped uniformly to another class; the default CNN trained
3 epochs and, separately, 20 epochs (the memorisation regime); for several noise seeds, every audit score side
by side with confident learning (cleanlab's label-quality score on K-fold cross-validated probabilities from the
same model and training settings).  Writes mean ± std into BENCHMARKS.md and the raw numbers as JSON.

    pip install cleanlab          # only for the comparison; not a trainfluence dependency
    python scripts/bench_mislabel.py --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import DEFAULT_MNIST, update_section  # noqa: E402

from trainfluence.audit.metrics import all_metrics  # noqa: E402
from trainfluence.audit.scores import SCORES, AuditContext, predict_proba  # noqa: E402
from trainfluence.checkpoint import load_checkpoint  # noqa: E402
from trainfluence.data import DataConfig, load_dataset  # noqa: E402
from trainfluence.influence import InfluenceEngine  # noqa: E402
from trainfluence.train import TrainConfig, train  # noqa: E402


def cross_validated_probs(train_set, cfg: TrainConfig, folds: int, work: Path, seed: int) -> np.ndarray:
    """Out-of-fold predicted probabilities: each example scored by a model that never saw it."""
    n = len(train_set)
    order = np.random.default_rng(seed).permutation(n)
    probs = np.zeros((n, train_set.num_classes))
    for f in range(folds):
        held = np.sort(order[f::folds])
        keep = np.setdiff1d(np.arange(n), held)
        part, held_set = train_set.subset(keep), train_set.subset(held)
        train(cfg, part, None, work / f"fold{f}", progress=False)
        model = load_checkpoint(work / f"fold{f}" / "final.pt").model
        probs[held] = predict_proba(model, held_set, "cpu")
    return probs


def run_weights(args, epochs: int, seed: int, work: Path) -> dict:
    """The ``--weights-study``: TracIn (logits) with ηₜ weights vs uniform weights vs the final loss, same model."""
    train_set, flipped, ckpt, fit = _trained(args, epochs, seed, work)
    ctx = AuditContext(ckpt, train_set, torch.device("cpu"), lambda: None, seed=seed)
    results = {"tracin (logits), ηₜ weights (default)": all_metrics(SCORES["tracin"](ctx), flipped)}
    ctx.tracin_weights = "uniform"
    results["tracin (logits), uniform weights"] = all_metrics(SCORES["tracin"](ctx), flipped)
    results["loss"] = all_metrics(SCORES["loss"](ctx), flipped)
    for k, v in results.items():
        print(f"epochs {epochs} seed {seed}  {k:40s} recall@10% {v['recall_at_10pct']:.4f}  AUC {v['roc_auc']:.4f}", flush=True)
    return {"metrics": results, "timing": {}, "test_accuracy": fit["test_accuracy"], "train_accuracy": fit["train_accuracy"]}


def _trained(args, epochs: int, seed: int, work: Path):
    cfg = DataConfig("mnist", data_root=args.data_root, train_size=args.train_size, test_size=2000,
                     label_noise=0.1, noise_seed=seed)
    train_set, test_set = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    flipped = (train_set.labels != train_set.clean_labels).numpy()
    run_dir = work / f"e{epochs}-s{seed}"
    fit = train(TrainConfig(epochs=epochs, seed=seed), train_set, test_set, run_dir, progress=False)
    return train_set, flipped, load_checkpoint(run_dir / "final.pt"), fit


def run_one(args, epochs: int, seed: int, work: Path) -> dict[str, dict[str, float]]:
    t0 = time.perf_counter()
    train_set, flipped, ckpt, fit = _trained(args, epochs, seed, work)
    tcfg = TrainConfig(epochs=epochs, seed=seed)
    run_dir = work / f"e{epochs}-s{seed}"
    results: dict[str, dict[str, float]] = {}
    timing = {"train_s": time.perf_counter() - t0}

    def engine():
        return InfluenceEngine(ckpt.model, train_set, solver="exact", params="last", damping=0.01,
                               weight_decay=ckpt.meta.weight_decay, cache_dir=work / "cache")

    for label, space in (("tracin (logits; default)", "logits"), ("tracin (all parameters)", "params")):
        ctx = AuditContext(ckpt, train_set, torch.device("cpu"), engine, tracin_space=space)
        t0 = time.perf_counter()
        results[label] = all_metrics(SCORES["tracin"](ctx), flipped)
        timing[label] = time.perf_counter() - t0
    ctx = AuditContext(ckpt, train_set, torch.device("cpu"), engine, seed=seed)
    for name in ("self_influence", "loss", "margin", "random"):
        t0 = time.perf_counter()
        label = "self_influence (last layer, exact)" if name == "self_influence" else name
        results[label] = all_metrics(SCORES[name](ctx), flipped)
        timing[label] = time.perf_counter() - t0
    if not args.skip_cleanlab:
        from cleanlab.rank import get_label_quality_scores

        t0 = time.perf_counter()
        probs = cross_validated_probs(train_set, tcfg, args.folds, run_dir / "cv", seed)
        labels = train_set.labels.numpy()
        for method in ("self_confidence", "normalized_margin"):
            quality = get_label_quality_scores(labels, probs, method=method)
            results[f"cleanlab {method} ({args.folds}-fold CV)"] = all_metrics(-quality, flipped)
        timing["cleanlab (incl. CV training)"] = time.perf_counter() - t0
    print(f"epochs {epochs} seed {seed}: train acc {fit['train_accuracy']:.4f} test acc {fit['test_accuracy']:.4f}", flush=True)
    for k, v in results.items():
        print(f"   {k:40s} recall@10% {v['recall_at_10pct']:.4f}  AUC {v['roc_auc']:.4f}", flush=True)
    return {"metrics": results, "timing": timing, "test_accuracy": fit["test_accuracy"], "train_accuracy": fit["train_accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=str(DEFAULT_MNIST))
    ap.add_argument("--train-size", type=int, default=10000)
    ap.add_argument("--epochs", type=int, nargs="+", default=[3, 20])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--skip-cleanlab", action="store_true")
    ap.add_argument("--weights-study", action="store_true",
                    help="only compare TracIn's checkpoint weights (ηₜ vs uniform) and the loss; own section")
    ap.add_argument("--json", default=None, help="raw results (default runs/bench_mislabel[_weights].json)")
    args = ap.parse_args()
    args.json = args.json or f"runs/bench_mislabel{'_weights' if args.weights_study else ''}.json"
    work = Path(tempfile.mkdtemp(prefix="bench_mislabel_"))
    run = run_weights if args.weights_study else run_one
    raw = {e: [run(args, e, s, work) for s in args.seeds] for e in args.epochs}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(raw, indent=1))

    sections = []
    for e, runs in raw.items():
        names = list(runs[0]["metrics"])
        acc = np.array([r["test_accuracy"] for r in runs])
        tr_acc = np.array([r["train_accuracy"] for r in runs])
        lines = [f"**{e} epochs** — train accuracy on the noisy labels {tr_acc.mean():.3f}, test accuracy "
                 f"{acc.mean():.3f} (mean of {len(runs)} noise seeds {', '.join(map(str, args.seeds))}).", "",
                 "| score | recall@5% | recall@10% | recall@20% | recall@30% | ROC AUC | avg. precision | F1 at #flipped | s |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for name in names:
            cells = []
            for key in ("recall_at_5pct", "recall_at_10pct", "recall_at_20pct", "recall_at_30pct", "roc_auc",
                        "average_precision", "f1_at_num_flipped"):
                v = np.array([r["metrics"][name][key] for r in runs])
                cells.append(f"{v.mean():.4f} ± {v.std():.4f}")
            times = [r["timing"].get(name, r["timing"].get("cleanlab (incl. CV training)")) for r in runs]
            t = "—" if None in times else f"{np.mean(times):.0f}"  # the --weights-study does not time its scores
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {t} |")
        sections.append("\n".join(lines))
    if args.weights_study:
        body = (f"### TracIn's checkpoint weights: MNIST first {args.train_size:,} training images, 10% flipped\n\n"
                "TracIn (logits) weighting each epoch checkpoint by its mean learning rate ηₜ (Pruthi et al.) or "
                "equally, beside the final loss, on the same models as the section above (same seeds).\n\n"
                + "\n\n".join(sections))
        print(body)
        update_section("mislabel_weights", body)
        return
    body = (f"### Mislabel detection: MNIST first {args.train_size:,} training images, 10% flipped, default CNN\n\n"
            "Every score computed on the same trained model in the same run; cleanlab gets out-of-fold probabilities "
            f"from {args.folds} extra trainings with the same settings. Last column: seconds to compute the score.\n\n"
            + "\n\n".join(sections))
    print(body)
    update_section("mislabel", body)


if __name__ == "__main__":
    main()
