"""Mislabel-detection benchmark over the regimes that matter (issue: audit in hard regimes).

MNIST, first 10,000 training images; noise kinds {uniform, asymmetric, instance} × rates {10%, 30%} × the default
CNN trained {3, 20} epochs (20: the memorisation regime) × noise seeds.  For every cell, every audit score on the
same trained model, beside confident learning (cleanlab's self-confidence on out-of-fold probabilities from
``--folds`` extra trainings of ``--cv-epochs`` epochs with the same settings — shared by both epoch columns,
since they depend only on the data).

Two phases, both run by default:

* ``--phase raw`` trains and writes every signal per cell to ``runs/bench_mislabel/*.npz`` (resumable: a cell
  already there is skipped) — the dynamics records, each checkpoint's probabilities, self-influence (last
  layer, exact), cleanlab's out-of-fold probabilities.
* ``--phase report`` scores every cell from those arrays with trainfluence's own functions (the audit's score
  registry, its fused score, its noise-rate estimate and suggested labels) and writes the tables to
  BENCHMARKS.md: recall at the true noise budget, ROC AUC, estimated vs true noise rate, suggested-label accuracy.

    pip install -e .[bench]     # cleanlab, only for the comparison; not a trainfluence dependency
    python scripts/bench_mislabel.py --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import DEFAULT_MNIST, update_section  # noqa: E402

from trainfluence.audit.scores import predict_proba, run_metas  # noqa: E402
from trainfluence.checkpoint import load_checkpoint  # noqa: E402
from trainfluence.data import DataConfig, load_dataset  # noqa: E402
from trainfluence.dynamics import load_record  # noqa: E402
from trainfluence.influence import InfluenceEngine  # noqa: E402
from trainfluence.train import TrainConfig, train  # noqa: E402

KINDS = ("uniform", "asymmetric", "instance")
RATES = (0.1, 0.3)


def cell_name(kind: str, rate: float, epochs: int, seed: int) -> str:
    return f"{kind}-{int(round(rate * 100))}-e{epochs}-s{seed}"


def cross_validated_probs(train_set, cfg: TrainConfig, folds: int, work: Path, seed: int) -> np.ndarray:
    """Out-of-fold predicted probabilities: each example scored by a model that never saw it."""
    n = len(train_set)
    order = np.random.default_rng(seed).permutation(n)
    probs = np.zeros((n, train_set.num_classes))
    for f in range(folds):
        held = np.sort(order[f::folds])
        keep = np.setdiff1d(np.arange(n), held)
        train(cfg, train_set.subset(keep), None, work / f"fold{f}", progress=False)
        probs[held] = predict_proba(load_checkpoint(work / f"fold{f}" / "final.pt").model, train_set.subset(held), "cpu")
    return probs


def raw_cell(args, kind: str, rate: float, seed: int, work: Path) -> None:
    """Train the 3- and 20-epoch models (and the CV models) for one noise draw; save every signal."""
    cfg = DataConfig("mnist", data_root=args.data_root, train_size=args.train_size, test_size=2000, label_noise=rate,
                     noise_seed=seed, noise_kind=kind)
    train_set, test_set = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    base = {"clean": train_set.clean_labels.numpy(), "labels": train_set.labels.numpy()}
    cv = None
    for epochs in args.epochs:
        out = args.raw / f"{cell_name(kind, rate, epochs, seed)}.npz"
        if out.exists():
            continue
        t0 = time.perf_counter()
        run_dir = work / cell_name(kind, rate, epochs, seed)
        fit = train(TrainConfig(epochs=epochs, seed=seed), train_set, test_set, run_dir, progress=False)
        ckpt = load_checkpoint(run_dir / "final.pt")
        train_s = time.perf_counter() - t0
        paths = [p for p, _ in run_metas(ckpt)[0]]
        t0 = time.perf_counter()
        ckpts = [load_checkpoint(p) for p in paths]
        probs = np.stack([predict_proba(c.model, train_set, "cpu") for c in ckpts]).astype(np.float32)
        lrs = np.array([c.meta.optimizer["lr"] for c in ckpts])
        logits = np.stack([load_record(p.parent, c.meta.dynamics, len(train_set), 10) for p, c in zip(paths, ckpts)])
        ckpt_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine = InfluenceEngine(ckpt.model, train_set, solver="exact", params="last", damping=0.01,
                                 weight_decay=ckpt.meta.weight_decay, cache_dir=work / "cache")
        self_inf = engine.self_influence()
        si_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        if cv is None and not args.skip_cleanlab:
            cv = cross_validated_probs(train_set, TrainConfig(epochs=args.cv_epochs, seed=seed), args.folds,
                                       work / f"cv-{kind}-{rate}-{seed}", seed)
        cv_s = time.perf_counter() - t0
        np.savez(out, **base, checkpoint_probs=probs, lrs=lrs, logits=logits.astype(np.float16), self_influence=self_inf,
                 **({"cv_probs": cv} if cv is not None else {}),
                 meta=json.dumps({"train_accuracy": fit["train_accuracy"], "test_accuracy": fit["test_accuracy"],
                                  "train_s": train_s, "checkpoint_pass_s": ckpt_s, "self_influence_s": si_s,
                                  "cv_s": cv_s, "folds": args.folds, "cv_epochs": args.cv_epochs}))
        print(f"{out.name}: train acc {fit['train_accuracy']:.3f} test acc {fit['test_accuracy']:.3f} "
              f"({train_s:.0f} s train, {ckpt_s:.0f} s checkpoints, {si_s:.0f} s self-influence, {cv_s:.0f} s CV)",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=str(DEFAULT_MNIST))
    ap.add_argument("--train-size", type=int, default=10000)
    ap.add_argument("--epochs", type=int, nargs="+", default=[3, 20])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--rates", type=float, nargs="+", default=list(RATES))
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--cv-epochs", type=int, default=3)
    ap.add_argument("--skip-cleanlab", action="store_true")
    ap.add_argument("--phase", choices=("raw", "report", "both"), default="both")
    ap.add_argument("--raw", type=Path, default=Path("runs/bench_mislabel"), help="folder of the per-cell arrays")
    ap.add_argument("--section", default="mislabel", help="the BENCHMARKS.md section the report replaces")
    args = ap.parse_args()
    torch.set_num_threads(2)
    args.raw.mkdir(parents=True, exist_ok=True)
    if args.phase in ("raw", "both"):
        work = args.raw / "work"
        for seed, kind, rate in itertools.product(args.seeds, args.kinds, args.rates):  # a whole grid per seed first
            raw_cell(args, kind, rate, seed, work)
    if args.phase in ("report", "both"):
        from bench_mislabel_report import report

        body = report(args)
        print(body)
        update_section(args.section, body)


if __name__ == "__main__":
    main()
