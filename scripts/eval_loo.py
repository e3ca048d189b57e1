"""Influence vs leave-one-out retraining (Koh & Liang 2017, Fig. 2 protocol) and solver figures.

Parts (``--part``, default all):
  logreg  MNIST 10-class logistic regression with L2: fit to the optimum, s_test by CG, influence of every
          training image on a few test points, then actual retraining without each of the top-|influence|
          images (warm-started L-BFGS from the optimum); Pearson and Spearman of predicted vs actual change of
          the test loss; scatter plot.
  cnn     the default CNN on an MNIST subset (100 images by default), the same protocol: the model refined by
          full-batch float64 L-BFGS (ReLU makes the objective non-smooth, so not to a stationary point), influence
          with damping that makes H + λI definite, each removal retrained by a fixed number of warm-started L-BFGS
          iterations and compared with a baseline retrained the same way with nothing removed.  With
          ``--reference pbrf`` the ground truth is instead the proximal Bregman response to each removal (Bae et al.
          2022; trainfluence.validation), which influence with the Gauss–Newton curvature approximates to first
          order whether or not the model is at a stationary point.

Every solver's agreement with the exact solve, and its time, is measured by scripts/bench_lds.py (in one run, with
the linear datamodeling score beside it).

    python scripts/eval_loo.py --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import pearsonr, spearmanr  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import DEFAULT_MNIST, table, update_section  # noqa: E402

from trainfluence.checkpoint import load_checkpoint  # noqa: E402
from trainfluence.data import DataConfig, load_dataset  # noqa: E402
from trainfluence.influence import InfluenceEngine  # noqa: E402
from trainfluence.report.figures import plt, save_figure  # noqa: E402
from trainfluence.models import build_model  # noqa: E402
from trainfluence.removal import DIRECT_SOLVERS  # noqa: E402
from trainfluence.objective import FunctionalModel, Objective  # noqa: E402
from trainfluence.train import TrainConfig, train  # noqa: E402
from trainfluence.validation import example_losses, leave_one_out, objective_value, proximal_response, refit  # noqa: E402


def set_params(model: torch.nn.Module, params: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in params:
                p.copy_(params[name])


def agreement(predicted: np.ndarray, actual: np.ndarray, slope: bool = True) -> dict[str, float]:
    """Pearson and Spearman of predicted against actual changes, and the least-squares slope actual/predicted."""
    out = {"pearson": float(pearsonr(predicted, actual)[0]), "spearman": float(spearmanr(predicted, actual)[0])}
    if slope:
        out["slope"] = float(actual @ predicted / (predicted @ predicted))
    return out


def loo_experiment(model, train_set, test_set, wd: float, damping: float | str, solver: str, solver_settings: dict,
                   tests: int, top: int, work: Path, label: str, refit_args: dict, curvature: str = "ggn",
                   references: tuple[str, ...] = ("loo",), pbrf_fraction: float = 1.0,
                   keep: Path | None = None) -> dict[str, dict]:
    """Influence of every training image on a few test points, then each reference's actual change for the top
    removals: {reference: figures}, the same influence scored against each."""
    engine = InfluenceEngine(model, train_set, solver=solver, damping=damping, weight_decay=wd, params="all",
                             curvature=curvature, solver_settings=solver_settings, cache_dir=work / "cache")
    fm, obj = engine.fm, engine.objective
    x, y = test_set.tensors()
    losses = example_losses(fm, obj, fm.params, (x, y))
    # test points as in Koh & Liang: ones the model gets wrong (large loss) and ordinary ones
    chosen = list(np.argsort(-losses)[: (tests + 1) // 2]) + list(np.argsort(-losses)[len(losses) // 2 :: 997][: tests // 2])
    t0 = time.perf_counter()
    infl = engine.influence((x[chosen], y[chosen]))
    s_test_s = (time.perf_counter() - t0) / len(chosen)
    print(f"{label}: s_test for {len(chosen)} test points, {s_test_s:.1f} s each", flush=True)
    tops = [np.argsort(-np.abs(row))[:top] for row in infl]
    removed = np.unique(np.concatenate(tops))  # every removal is retrained once and serves all test points
    newton = None  # the Newton step only where it is cheap (with CG it is K solves per removed image)
    if engine.solver.name in DIRECT_SOLVERS:
        t0 = time.perf_counter()
        newton, leverage = engine.removal_effect((x[chosen], y[chosen]), removed)  # [tests, removed]
        newton_s = time.perf_counter() - t0
        print(f"{label}: Newton-step removal effects of {len(removed)} images in {newton_s:.1f} s; leverage "
              f"{leverage.min():.3f}–{leverage.max():.3f}", flush=True)
    out = {}
    for reference in references:
        t1 = time.perf_counter()
        done = lambda k: print(f"{label} ({reference}): retrained {k}/{len(removed)} ({time.perf_counter() - t1:.0f} s)",
                               flush=True)
        if reference == "pbrf":  # that share of each image removed, the change divided by it
            actual_all = proximal_response(fm, obj, train_set, (x[chosen], y[chosen]), removed, engine.damping,
                                           progress=done, fraction=pbrf_fraction, **refit_args) / pbrf_fraction
            retrainings = len(removed)
        else:
            actual_all = leave_one_out(fm, obj, train_set, (x[chosen], y[chosen]), removed, progress=done, **refit_args)
            retrainings = len(removed) + 1  # and the baseline
        retrain_s = (time.perf_counter() - t1) / retrainings
        if keep is not None:  # the raw figures, for analyses beyond this table
            np.savez(keep / f"{label.split()[0].lower()}_{reference}.npz", chosen=np.array(chosen), infl=infl,
                     removed=removed, actual=actual_all, n=engine.n, damping=engine.damping)
        pred_all, newton_all, act_all, per_point = [], [], [], []
        for row, (t, idx) in enumerate(zip(chosen, tops)):
            predicted = -infl[row][idx] / engine.n
            cols = np.searchsorted(removed, idx)
            actual = actual_all[cols, row]
            point = {"test_index": int(t), "test_loss": float(losses[t]), **agreement(predicted, actual, slope=False)}
            if newton is not None:
                point.update({f"newton_{k}": v for k, v in agreement(newton[row, cols], actual, slope=False).items()})
                newton_all += newton[row, cols].tolist()
            per_point.append(point)
            pred_all += predicted.tolist()
            act_all += actual.tolist()
            print(f"{label} ({reference}): test point {t}: Pearson {point['pearson']:.3f}"
                  + (f", Newton step {point['newton_pearson']:.3f}" if newton is not None else ""), flush=True)
        pred_all, act_all = np.array(pred_all), np.array(act_all)
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(act_all, pred_all, s=8)
        lim = max(np.abs(pred_all).max(), np.abs(act_all).max()) * 1.1
        ax.plot([-lim, lim], [-lim, lim], "k:")
        ax.set_xlabel("actual change in test loss (" + ("retrained" if reference == "loo" else "proximal Bregman response") + ")")
        ax.set_ylabel("predicted: −I_up,loss / n")
        ax.set_title(label, fontsize=9)
        fig.tight_layout()
        save_figure(fig, Path("runs") / f"loo_{label.split()[0].lower()}{'' if reference == 'loo' else '_' + reference}.png")
        out[reference] = {
            **agreement(pred_all, act_all), "points": per_point, "s_test_s": s_test_s,
            **({"newton": {**agreement(np.array(newton_all), act_all), "seconds": newton_s,
                           "leverage": [float(leverage.min()), float(leverage.max())]}} if newton is not None else {}),
            "retrain_s": retrain_s, "retrainings": retrainings, "refit": refit_args, "reference": reference,
            "fraction": pbrf_fraction if reference == "pbrf" else 1.0,
            "n": engine.n, "params": engine.fm.dim, "solver": solver, "solver_settings": solver_settings,
            "damping": damping if damping != "auto" else f"auto (λ = {engine.damping:.3g})", "curvature": curvature,
            "weight_decay": wd, "top": top}
    return out


def part_logreg(args, work: Path) -> dict:
    cfg = DataConfig("mnist", data_root=args.data_root, train_size=args.logreg_n, test_size=1000)
    train_set, test_set = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    torch.manual_seed(0)
    model = build_model("logreg", 10, 1, 28).double()
    fm = FunctionalModel(model, "all")
    t0 = time.perf_counter()
    set_params(model, refit(fm, Objective(args.logreg_wd), train_set, max_iter=2000))
    fit_s = time.perf_counter() - t0
    r = loo_experiment(model, train_set, test_set, args.logreg_wd, 0.0, "cg", {"rtol": 1e-10, "maxiter": 2000},
                       args.tests, args.top, work, "Logistic regression (MNIST)", {"max_iter": 500})["loo"]
    r["fit_s"] = fit_s
    return r


def part_cnn(args, work: Path) -> dict[str, dict]:
    cfg = DataConfig("mnist", data_root=args.data_root, train_size=args.cnn_n, test_size=1000)
    train_set, test_set = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    train(TrainConfig(epochs=args.cnn_epochs, weight_decay=args.cnn_wd), train_set, test_set, work / "cnn", progress=False)
    model = load_checkpoint(work / "cnn" / "final.pt").model.double()
    fm, objective = FunctionalModel(model, "all"), Objective(args.cnn_wd)
    t0 = time.perf_counter()
    set_params(model, refit(fm, objective, train_set, max_iter=args.cnn_refine))
    refine_s = time.perf_counter() - t0
    if args.keep:
        torch.save(model.state_dict(), Path(args.keep) / "cnn_refined.pt")
    fm = FunctionalModel(model, "all")
    x, y = train_set.tensors()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in fm.params.items()}
    objective_value(fm, objective, params, x, y).backward()
    grad_norm = float(torch.cat([p.grad.flatten() for p in params.values()]).norm())
    print(f"CNN refined by {args.cnn_refine} L-BFGS iterations in {refine_s:.0f} s; gradient norm {grad_norm:.2e}", flush=True)
    solver_settings = {"rtol": 1e-6, "maxiter": args.cnn_cg_maxiter} if args.cnn_solver == "cg" else {}
    got = loo_experiment(model, train_set, test_set, args.cnn_wd, args.cnn_damping, args.cnn_solver,
                         solver_settings, args.tests, args.top, work,
                         "Default CNN (MNIST subset)", {"max_iter": args.cnn_refit}, curvature=args.cnn_curvature,
                         references=tuple(args.reference), pbrf_fraction=args.pbrf_fraction,
                         keep=Path(args.keep) if args.keep else None)
    out = {}
    for reference, r in got.items():
        r.update(refine_s=refine_s, refine_iterations=args.cnn_refine, gradient_norm=grad_norm, epochs=args.cnn_epochs)
        key = "cnn" if reference == "loo" else "cnn_pbrf" + ("" if r["fraction"] == 1 else f"_{r['fraction']:g}")
        out[key] = r
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=str(DEFAULT_MNIST))
    ap.add_argument("--part", nargs="+", default=["logreg", "cnn"], choices=["logreg", "cnn"])
    ap.add_argument("--tests", type=int, default=3, help="test points per model")
    ap.add_argument("--top", type=int, default=30, help="retrained removals per test point (top |influence|)")
    ap.add_argument("--logreg-n", type=int, default=20000)
    ap.add_argument("--logreg-wd", type=float, default=0.01)
    ap.add_argument("--cnn-n", type=int, default=100)
    ap.add_argument("--cnn-epochs", type=int, default=10)
    ap.add_argument("--cnn-wd", type=float, default=0.01)
    ap.add_argument("--cnn-damping", type=lambda v: v if v == "auto" else float(v), default=0.1,
                    help="with --cnn-curvature hessian, the refined CNN's Hessian has eigenvalues down to about -0.04 "
                         "(measured): λ makes H + λI definite")
    ap.add_argument("--cnn-curvature", default="ggn", choices=["ggn", "hessian"])
    ap.add_argument("--cnn-refine", type=int, default=300, help="L-BFGS iterations before influence (not to a stationary point)")
    ap.add_argument("--cnn-refit", type=int, default=100, help="L-BFGS iterations of each retraining (and of the baseline)")
    ap.add_argument("--cnn-solver", default="exact", choices=["exact", "cg"],
                    help="exact: in the span of the 100 images' Gauss–Newton factors (needs --cnn-curvature ggn)")
    ap.add_argument("--cnn-cg-maxiter", type=int, default=300)
    ap.add_argument("--reference", nargs="+", default=["loo"], choices=["loo", "pbrf"],
                    help="the CNN's ground truth: leave-one-out retraining, and/or the proximal Bregman response")
    ap.add_argument("--pbrf-fraction", type=float, default=1.0,
                    help="the share of each image the proximal response removes (its change divided by it): below 1 it "
                         "measures the derivative that influence predicts, free of the removal's higher-order terms")
    ap.add_argument("--json", default="runs/eval_loo.json")
    ap.add_argument("--keep", default=None, help="a folder for the raw arrays (influence, actual changes, refined model)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="eval_loo_"))
    out_path = Path(args.json)
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    parts = {"logreg": part_logreg, "cnn": part_cnn}
    for name in args.part:
        got = parts[name](args, work)
        results.update(got if name == "cnn" else {name: got})
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=1))
    update_section("loo", render(results))


def _reference_text(e: dict) -> tuple[str, str]:
    """How an entry's ground truth was obtained: (what was done to each top image, the sentence on the refits)."""
    if e.get("reference", "loo") == "loo":
        return ("each removed and the model retrained (warm-started L-BFGS)",
                f"Each retraining is {e['refit']['max_iter']} L-BFGS iterations from the refined parameters, and the "
                f"actual change is measured against a baseline retrained the same way with nothing removed "
                f"({e['retrainings']} retrainings, {e['retrain_s']:.0f} s each).")
    fraction = e.get("fraction", 1.0)
    how = ("each removed and its proximal Bregman response minimised" if fraction == 1 else
           f"each with {fraction:g} of its weight removed and its proximal Bregman response minimised, the change "
           f"divided by {fraction:g}")
    return (how, "Each response (trainfluence.validation.proximal_response: the KL divergence to the refined model's "
                 "outputs on every training image, minus the removed share of the image's loss, plus (wd + λ)/2 "
                 f"‖θ − θ̂‖²) is minimised by {e['refit']['max_iter']} L-BFGS iterations from the refined parameters, "
                 f"which are its solution with nothing removed ({e['retrainings']} minimisations, "
                 f"{e['retrain_s']:.0f} s each).")


def render(r: dict) -> str:
    lines = ["### Influence vs leave-one-out retraining (Koh & Liang Fig. 2 protocol), MNIST", ""]
    titles = {"logreg": "10-class logistic regression, L2", "cnn": "default CNN (all parameters)"}
    for key in ["logreg", "cnn"] + sorted(k for k in r if k.startswith("cnn_pbrf")):
        if key not in r:
            continue
        e = r[key]
        title = titles.get(key, "default CNN (all parameters) against the proximal Bregman response")
        how, refit_sentence = _reference_text(e)
        lines.append(f"**{title}**: n = {e['n']:,} training images, {e['params']:,} parameters, wd = {e['weight_decay']}, "
                     f"curvature {e.get('curvature', 'hessian')}, damping {e['damping']}, solver {e['solver']} {e['solver_settings']}; top {e['top']} training images by "
                     f"|influence| for each of {len(e['points'])} test points, {how}. "
                     f"**Pearson {e['pearson']:.3f}, Spearman {e['spearman']:.3f}** over all "
                     f"pairs; slope actual/predicted {e['slope']:.2f}; {e['s_test_s']:.1f} s per s_test."
                     + (f" **The Newton step with each image's leverage** (`InfluenceEngine.removal_effect`, what "
                        f"`explain` reports as the change if removed): **Pearson {e['newton']['pearson']:.3f}, Spearman "
                        f"{e['newton']['spearman']:.3f}**, slope {e['newton']['slope']:.2f} (leverage "
                        f"{e['newton']['leverage'][0]:.3f}–{e['newton']['leverage'][1]:.3f}; {e['newton']['seconds']:.1f} s "
                        "for all the removed images)." if "newton" in e else ""))
        if "refine_iterations" in e:
            lines.append("")
            lines.append(f"The CNN was trained {e['epochs']} epochs (SGD, wd {e['weight_decay']}), then refined by "
                         f"{e['refine_iterations']} full-batch L-BFGS iterations in float64 ({e['refine_s']:.0f} s); it is not at a "
                         f"stationary point (gradient norm {e['gradient_norm']:.1e}: ReLU and max-pool make the objective "
                         "non-smooth and L-BFGS stalls); " + ("the Gauss–Newton curvature is positive semi-definite there" if
                         e.get("curvature") == "ggn" else "its Hessian is indefinite, so damping makes H + λI definite")
                         + ". " + refit_sentence)
        lines.append("")
        newton = "newton" in e
        lines.append(table(["test point", "test loss", "Pearson", "Spearman"]
                           + (["Pearson, Newton step", "Spearman, Newton step"] if newton else []),
                           [[p["test_index"], p["test_loss"], p["pearson"], p["spearman"]]
                            + ([p["newton_pearson"], p["newton_spearman"]] if newton else []) for p in e["points"]]))
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
