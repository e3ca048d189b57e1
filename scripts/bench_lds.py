"""Linear datamodeling score (LDS; Park et al. 2023, TRAK; dattri's benchmark) of every influence solver and
curvature, beside Kronfluence and TRAK in the same run (issue: influence a user can trust at the defaults).

Protocol.  A seeded subset of ``--n`` MNIST training images and ``--tests`` test images; the model trained on all
of them; ``--subsets`` random halves Sⱼ of the training subset, a model trained on each (``--seeds`` seeds each,
their test losses averaged).  For a method with scores τ(t, i) (I_up,loss: positive = harmful), its LDS is the
mean over test points t of the Spearman correlation, across the halves j, between Σ_{i∈Sⱼ} τ(t, i) and the test
loss of t under the model trained on Sⱼ.  Wall time: from the trained model and data to the [tests, n] score
matrix, everything included (gradient store, factors, solves).  Subset trainings are cached in ``--work``.

    python scripts/bench_lds.py --part lr
    python scripts/bench_lds.py --part mlp
    python scripts/bench_lds.py --part cnn

Ensembles (MLP and CNN): five independently trained models, and the epoch checkpoints of the first model's own
run (no training beyond the single model's), ours and Kronfluence's alike.

Peers (``pip install -e '.[bench]'``): Kronfluence's EK-FAC (its heuristic damping and a fixed one) and TRAK
(one model and five); they are skipped, with a note, when not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import DEFAULT_MNIST, ROOT, table, update_section  # noqa: E402

from trainfluence.checkpoint import load_checkpoint  # noqa: E402
from trainfluence.data import DataConfig, load_dataset  # noqa: E402
from trainfluence.influence import InfluenceEngine  # noqa: E402
from trainfluence.settings.influence import DAMPING_AUTO_FRACTION  # noqa: E402
from trainfluence.models import build_model  # noqa: E402
from trainfluence.objective import FunctionalModel, Objective  # noqa: E402
from trainfluence.train import TrainConfig, epoch_checkpoints, train  # noqa: E402
from trainfluence.validation import refit  # noqa: E402

warnings.filterwarnings("ignore")
PARTS = {
    # arch, weight decay, training (None: L-BFGS to the optimum), seeds per subset by default
    "lr": ("logreg", 0.01, None, 1),
    "mlp": ("mlp", 1e-3, TrainConfig(arch="mlp", epochs=10, lr=1e-3, weight_decay=1e-3, batch_size=64), 3),
    "cnn": ("cnn", 5e-4, TrainConfig(arch="cnn", epochs=3, lr=3e-3, weight_decay=5e-4, batch_size=64), 1),
}


# ---- data and models ----------------------------------------------------------------------------------------------
def mnist_subset(args) -> tuple[Any, Any]:
    cfg = DataConfig("mnist", data_root=args.data_root)
    train_all, test_all = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    rng = np.random.default_rng(args.data_seed)
    tr = np.sort(rng.choice(len(train_all), size=args.n, replace=False))
    te = np.sort(rng.choice(len(test_all), size=args.tests, replace=False))
    return train_all.subset(tr), test_all.subset(te)


def fit(part: str, data, seed: int, folder: Path, init: torch.nn.Module | None = None) -> torch.nn.Module:
    """The model of ``part`` trained on ``data`` (a dataset), as the benchmark trains every model."""
    arch, wd, cfg, _ = PARTS[part]
    if cfg is None:  # convex: L-BFGS to the optimum, warm-started from ``init``
        torch.manual_seed(seed)
        model = init if init is not None else build_model(arch, 10, 1, 28)
        model = _copy(model)
        fm = FunctionalModel(model, "all")
        params = refit(fm, Objective(wd), data, max_iter=1000, tolerance=1e-10)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params[name])
        return model.eval()
    train(TrainConfig(**{**cfg.__dict__, "seed": seed}), data, None, folder, progress=False)
    return load_checkpoint(folder / "final.pt").model


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


@torch.no_grad()
def test_losses(model: torch.nn.Module, test) -> np.ndarray:
    x, y = test.tensors()
    return F.cross_entropy(model.eval()(x), y, reduction="none").double().numpy()


def subset_losses(args, part: str, train_set, test_set, base: torch.nn.Module, work: Path,
                  per_seed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Masks [M, n] of the halves and the test losses [M, tests] of the models trained on them (seed-averaged;
    ``per_seed``: [M, seeds, tests]).  Seed s of a half starts from the same initial weights as model-s below."""
    rng = np.random.default_rng(args.subset_seed)
    masks = np.zeros((args.subsets, len(train_set)), dtype=bool)
    for j in range(args.subsets):
        masks[j, rng.choice(len(train_set), size=len(train_set) // 2, replace=False)] = True
    cache = work / f"subset_losses_{args.subsets}x{args.seeds}.npz"
    losses = np.full((args.subsets, args.seeds, len(test_set)), np.nan)
    for other in sorted(work.glob(f"subset_losses_{args.subsets}x*.npz")):  # seed s is the same model in every cache
        stored = np.load(other)
        if stored["losses"].shape[2] == losses.shape[2] and np.array_equal(stored["masks"], masks):
            have = min(args.seeds, stored["losses"].shape[1])
            losses[:, :have] = np.where(np.isfinite(losses[:, :have]), losses[:, :have], stored["losses"][:, :have])
    started = time.perf_counter()
    for j in range(args.subsets):
        for s in range(args.seeds):
            if np.isfinite(losses[j, s]).all():
                continue
            with tempfile.TemporaryDirectory() as tmp:
                model = fit(part, train_set.subset(np.nonzero(masks[j])[0]), s, Path(tmp), init=base)
            losses[j, s] = test_losses(model, test_set)
            np.savez(cache, losses=losses, masks=masks)
        print(f"  subset {j + 1}/{args.subsets} trained ({time.perf_counter() - started:.0f} s)", flush=True)
    return masks, (losses if per_seed else losses.mean(1))


def agreement(tau: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Mean over test points of the Pearson correlation with the reference scores, and of the overlap of the 10
    most helpful training examples."""
    pearson = np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(tau, reference)])
    overlap = np.mean([len(set(np.argsort(a)[:10]) & set(np.argsort(b)[:10])) / 10 for a, b in zip(tau, reference)])
    return float(pearson), float(overlap)


def lds_per_test(tau: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Spearman(Σ_{i∈Sⱼ} τ(t, i), loss_j(t)) across the halves j, per test point t (the LDS is their mean)."""
    predicted = tau @ masks.T.astype(np.float64)  # [tests, M]
    return np.array([spearmanr(predicted[t], losses[:, t])[0] for t in range(len(tau))])


def paired_interval(a: np.ndarray, b: np.ndarray, draws: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a − b over test points and its 95% bootstrap interval (test points resampled, the same draws for
    both rows: the halves and their trained models are shared, so only the test points vary)."""
    d = a - b
    d = d[np.isfinite(d)]
    idx = np.random.default_rng(seed).integers(0, len(d), size=(draws, len(d)))
    means = d[idx].mean(1)
    return float(d.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


SWEEP_FRACTIONS = (0.001, 0.01, 0.1, 1.0)
ENSEMBLE_PARTS = ("mlp", "cnn")  # parts with five independently trained models, for the ensemble rows


# ---- methods ------------------------------------------------------------------------------------------------------
def ours(models: list[torch.nn.Module], train_set, test_set, wd: float, work: Path, **options: Any) -> tuple[np.ndarray, dict]:
    """τ from the trainfluence engine (averaged over ``models``), and what its solves reported."""
    taus, reports, dampings = [], [], []
    for k, model in enumerate(models):
        with tempfile.TemporaryDirectory(dir=work) as cache:
            engine = InfluenceEngine(model, train_set, weight_decay=wd, cache_dir=cache, device="cpu", **options)
            taus.append(engine.influence(test_set))
            reports += [r.describe() for r in engine.reports]
            dampings.append(engine.damping)
    return np.mean(taus, axis=0), {"solves": reports[:2], "damping": dampings}


def kronfluence_scores(model: torch.nn.Module, train_set, test_set, damping: float | None, work: Path,
                       strategy: str = "ekfac") -> tuple[np.ndarray, dict]:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    class Pairs(torch.utils.data.Dataset):
        def __init__(self, data):
            self.x, self.y = data.tensors()

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.x[i], self.y[i]

    logging.disable(logging.WARNING)
    task = Classification()
    prepared = prepare_model(_copy(model).eval(), task)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        analyzer = Analyzer("bench", prepared, task, cpu=True, disable_tqdm=True, output_dir=str(work / "kronfluence"))
        name = f"{strategy}-{damping}"
        analyzer.fit_all_factors(name, Pairs(train_set), per_device_batch_size=256,
                                 factor_args=FactorArguments(strategy=strategy), overwrite_output_dir=True)
        analyzer.compute_pairwise_scores(name, name, Pairs(test_set), Pairs(train_set), per_device_query_batch_size=64,
                                         per_device_train_batch_size=256, overwrite_output_dir=True,
                                         score_args=ScoreArguments(damping_factor=damping))
        scores = analyzer.load_pairwise_scores(name)["all_modules"].double().numpy()
    return -scores, {}  # Kronfluence: positive = helpful (lowers the query loss); ours: I_up,loss, positive = harmful


def kronfluence_ensemble(models: list[torch.nn.Module], train_set, test_set, damping: float | None,
                         work: Path) -> tuple[np.ndarray, dict]:
    """Kronfluence's scores averaged over ``models`` (each with its own factors), as ours average over members."""
    return np.mean([kronfluence_scores(m, train_set, test_set, damping, work)[0] for m in models], axis=0), {}


def trak_scores(models: list[torch.nn.Module], train_set, test_set, work: Path, proj_dim: int = 2048) -> tuple[np.ndarray, dict]:
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    logging.disable(logging.WARNING)
    x, y = train_set.tensors()
    xt, yt = test_set.tensors()
    grad_dim = sum(p.numel() for p in models[0].parameters())
    folder = tempfile.mkdtemp(dir=work)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        projector = BasicProjector(grad_dim=grad_dim, proj_dim=proj_dim, seed=0, proj_type=ProjectionType.rademacher,
                                   device="cpu", dtype=torch.float32)
        traker = TRAKer(model=models[0], task="image_classification", train_set_size=len(y), save_dir=folder,
                        device="cpu", projector=projector, proj_dim=proj_dim, use_half_precision=False)
        for k, model in enumerate(models):
            traker.load_checkpoint({kk: v for kk, v in model.state_dict().items()}, model_id=k)
            for i in range(0, len(y), 256):
                traker.featurize(batch=(x[i : i + 256], y[i : i + 256]), num_samples=len(y[i : i + 256]))
        traker.finalize_features()
        for k, model in enumerate(models):
            traker.start_scoring_checkpoint(exp_name="lds", checkpoint=model.state_dict(), model_id=k,
                                            num_targets=len(yt))
            for i in range(0, len(yt), 256):
                traker.score(batch=(xt[i : i + 256], yt[i : i + 256]), num_samples=len(yt[i : i + 256]))
        scores = traker.finalize_scores(exp_name="lds")
    return -np.asarray(scores).T.astype(np.float64), {}  # TRAK: positive = helpful


def timed(fn: Callable[[], tuple[np.ndarray, dict]]) -> tuple[np.ndarray, float, dict]:
    start = time.perf_counter()
    tau, info = fn()
    return tau, time.perf_counter() - start, info


# ---- the run -----------------------------------------------------------------------------------------------------
def add_protocol_args(ap: argparse.ArgumentParser, parts: list[str]) -> None:
    """The protocol's settings (data, halves, models per half, where the trainings are cached), shared with
    scripts/bench_checkpoints.py."""
    ap.add_argument("--part", choices=parts, required=True)
    ap.add_argument("--data-root", default=str(DEFAULT_MNIST))
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--tests", type=int, default=200)
    ap.add_argument("--subsets", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=None, help="models per half (default: 1 for lr and cnn, 3 for mlp)")
    ap.add_argument("--data-seed", type=int, default=2026)
    ap.add_argument("--subset-seed", type=int, default=7)
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_lds"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(ap, list(PARTS))
    ap.add_argument("--methods", nargs="*", default=None, help="only these rows (names as in the table)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update BENCHMARKS.md or the results JSON")
    ap.add_argument("--damping-sweep", action="store_true",
                    help="only the defaults at damping f × the mean Gauss–Newton eigenvalue for f in "
                         f"{SWEEP_FRACTIONS} (the evidence for DAMPING_AUTO_FRACTION); its own section in BENCHMARKS.md")
    args = ap.parse_args()
    part = args.part
    arch, wd, cfg, default_seeds = PARTS[part]
    args.seeds = args.seeds or default_seeds
    work = Path(args.work) / part
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(torch.get_num_threads())
    train_set, test_set = mnist_subset(args)
    print(f"{part}: {len(train_set)} training images, {len(test_set)} test images; training the models …", flush=True)
    models = []
    for s in range(5 if part in ENSEMBLE_PARTS else 1):
        folder = work / f"model-{s}"
        if (folder / "final.pt").is_file() and cfg is not None:
            models.append(load_checkpoint(folder / "final.pt").model)
        else:
            models.append(fit(part, train_set, s, folder))
    model = models[0]
    # the epoch checkpoints of the first model's run (its last one is ``model`` itself): an ensemble that needs no
    # more training than the single model
    run = [load_checkpoint(path).model for path in epoch_checkpoints(work / "model-0")] if cfg is not None else []
    masks, losses = subset_losses(args, part, train_set, test_set, model, work)
    p = sum(q.numel() for q in model.parameters())
    damping = 0.01
    rows: list[list[Any]] = []
    results: dict[str, dict] = {}
    results_file = "results_damping.json" if args.damping_sweep else "results.json"
    methods: list[tuple[str, Callable[[], tuple[np.ndarray, dict]]]] = []

    def add(name: str, fn: Callable[[], tuple[np.ndarray, dict]], sweep: bool = False) -> None:
        """A row, if this run wants it: with --damping-sweep only the sweep's rows and the defaults row (whatever
        --methods says: the sweep scales the λ it resolves)."""
        chosen = args.methods is None or name in args.methods
        if (chosen and sweep == args.damping_sweep) or (args.damping_sweep and name == defaults):
            methods.append((name, fn))

    def row(name: str, members: list | None = None, **options: Any) -> None:
        add(name, lambda: ours(members or [model], train_set, test_set, wd, work, **options))

    from trainfluence.influence import resolve_solver

    default_solver = resolve_solver("auto", FunctionalModel(model, "all"))
    from trainfluence.settings.influence import InfluenceSettings

    defaults = f"trainfluence defaults (solver auto → {default_solver}, damping {InfluenceSettings().damping})"
    row(defaults)
    if default_solver in ("ekfac", "kfac"):
        row(f"trainfluence defaults, {default_solver} labels sampled (one per example)",
            solver_settings={"labels": "sampled"})
        row(f"trainfluence defaults, {default_solver} trace tol 0 (every one of H_f's K − 1 directions)",
            solver_settings={"trace_tol": 0.0})
    if args.damping_sweep:  # λ = f × the mean GGN eigenvalue, from the λ the defaults row resolved (f = the default)
        for f in SWEEP_FRACTIONS:
            if f != DAMPING_AUTO_FRACTION:
                add(f"trainfluence defaults, damping {f:g} × mean GGN eigenvalue",
                    lambda f=f: ours([model], train_set, test_set, wd, work,
                                     damping=results[defaults]["damping"][0] * f / DAMPING_AUTO_FRACTION),
                    sweep=True)
    if p <= 20000:
        row("trainfluence exact, damping 0.01", solver="exact", damping=damping)
        row("trainfluence exact, damping auto", solver="exact", damping="auto")
        row("trainfluence cg, damping 0.01", solver="cg", damping=damping)
        row("trainfluence lissa, damping 0.01", solver="lissa", damping=damping)
        row("trainfluence lissa, no preconditioner, damping 0.01", solver="lissa", damping=damping,
            solver_settings={"preconditioner": "none"})
        row("trainfluence arnoldi (rank auto), damping 0.01", solver="arnoldi", damping=damping)
        row("trainfluence arnoldi, rank 50, damping 0.01", solver="arnoldi", damping=damping, solver_settings={"rank": 50})
        row("trainfluence cg, curvature hessian, damping 0.01", solver="cg", curvature="hessian", damping=damping)
    else:
        row("trainfluence exact, last layer, damping 0.01", solver="exact", params="last", damping=damping)
    for solver in ("ekfac", "kfac"):
        for d in (damping, "auto"):
            if not (solver == default_solver and d == "auto"):
                row(f"trainfluence {solver}, damping {d}", solver=solver, damping=d)
    if part in ENSEMBLE_PARTS:
        row("trainfluence defaults, 5 models", members=models)
        row(f"trainfluence defaults, the {len(run)} epoch checkpoints of one run", members=run)
    if part in ("mlp", "cnn"):
        for k in (4096, 16384):
            row(f"trainfluence defaults, gradients projected to k = {k:,}", projection_dim=k)
        row("trainfluence defaults, kronecker (LoGra) projection to k = 16,384", projection_dim=16384,
            projection="kronecker")
    if not args.no_peers:
        try:
            import kronfluence  # noqa: F401

            add("Kronfluence EK-FAC, its heuristic damping", lambda: kronfluence_scores(model, train_set, test_set, None, work))
            add(f"Kronfluence EK-FAC, damping {damping}", lambda: kronfluence_scores(model, train_set, test_set, damping, work))
            if part in ENSEMBLE_PARTS:
                add("Kronfluence EK-FAC, its heuristic damping, 5 models",
                    lambda: kronfluence_ensemble(models, train_set, test_set, None, work))
                add(f"Kronfluence EK-FAC, its heuristic damping, the {len(run)} epoch checkpoints of one run",
                    lambda: kronfluence_ensemble(run, train_set, test_set, None, work))
        except ImportError:
            print("Kronfluence not installed: skipped (pip install -e '.[bench]')")
        try:
            import trak  # noqa: F401

            add("TRAK, 1 model", lambda: trak_scores([model], train_set, test_set, work))
            if part in ENSEMBLE_PARTS:
                add("TRAK, 5 models", lambda: trak_scores(models, train_set, test_set, work))
        except ImportError:
            print("TRAK not installed: skipped (pip install -e '.[bench]')")

    taus: dict[str, np.ndarray] = {}
    rho: dict[str, np.ndarray] = {}
    for name, fn in methods:
        print(f"{name} …", flush=True)
        try:
            tau, seconds, info = timed(fn)
        except Exception as exc:  # a method that fails is a row saying so, not a lost run
            print(f"  failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
            results[name] = {"failed": str(exc).splitlines()[0][:200]}
            continue
        taus[name] = tau
        rho[name] = lds_per_test(tau, masks, losses)
        results[name] = {"lds": float(np.nanmean(rho[name])), "seconds": seconds, "rho": rho[name].tolist(), **info}
        print(f"  LDS {results[name]['lds']:.3f}  {seconds:.1f} s  {info.get('solves', '')}", flush=True)
        if not args.no_write:  # after every row: a long run that stops keeps what it measured
            (work / results_file).write_text(json.dumps(results, indent=2))
    for name, r in results.items():
        if "failed" in r:
            rows.append([name, "failed", "—", "—", "—", "—", r["failed"][:80]])
            continue
        # the exact solve at the same damping as the row (the defaults' damping is auto)
        same = "auto" if name.startswith("trainfluence defaults") or "damping auto" in name else str(damping)
        reference = taus.get(f"trainfluence exact, damping {same}")
        pearson, overlap = agreement(taus[name], reference) if reference is not None else (None, None)
        r.update(pearson_vs_exact=pearson, top10_vs_exact=overlap)
        diff = "—"
        if defaults in rho and name != defaults and name in rho:
            mean, lo, hi = paired_interval(rho[defaults], rho[name])
            diff = f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        rows.append([name, r["lds"], diff, r["seconds"], "—" if pearson is None else f"{pearson:.5f}",
                     "—" if overlap is None else f"{100 * overlap:.1f}%", "; ".join(r.get("solves", []))[:110]])
    if not args.no_write:
        (work / results_file).write_text(json.dumps(results, indent=2))

    title = {"lr": "10-class logistic regression (7,850 parameters)", "mlp": f"MLP 784-128-128-10 ({p:,} parameters)",
             "cnn": f"default CNN ({p:,} parameters)"}[part]
    if args.damping_sweep:
        title += f", damping auto = f × the mean Gauss–Newton eigenvalue (the default f = {DAMPING_AUTO_FRACTION:g}; "
        title += f"this part's λ at f = {DAMPING_AUTO_FRACTION:g}: {results[defaults]['damping'][0]:.3g})"
    body = f"""### LDS, {title}

MNIST: {args.n:,} training and {args.tests} test images (seeded subsets), {args.subsets} random halves, {args.seeds}
model(s) per half; weight decay {wd}; damping as stated per row (peers: λ without weight decay, which they do not
model). Wall time from the trained model to the [tests, n] scores, everything included (gradient store, factors,
solves), in one run on this machine: compare within the table.

{table(["method", "LDS", "defaults − row [95% CI]", "seconds", "Pearson vs exact", "top-10 overlap vs exact", "solve"], rows)}

Defaults − row: the mean over test points of the defaults' Spearman minus the row's, with its 95% paired bootstrap
interval over the {args.tests} test points (10,000 draws): an interval that contains 0 means the two are not told
apart by this benchmark. Pearson and top-10 overlap: against the exact solve at the same damping, mean over test points.
"""
    print(body)
    if not args.no_write:
        update_section(f"lds_damping_{part}" if args.damping_sweep else f"lds_{part}", body)


if __name__ == "__main__":
    main()
