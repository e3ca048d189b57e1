"""Influence functions checked against exact algebra, re-fitting and leave-one-out retraining."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from torch import nn
from torch.func import hessian

from trainfluence.data import DataConfig, load_dataset
from trainfluence.data.source import TensorSource
from trainfluence.errors import UserError
from trainfluence.gradients import rows_within
from trainfluence.hvp import HessianOperator
from trainfluence.influence import InfluenceEngine
from trainfluence.models import build_model
from trainfluence.objective import FunctionalModel, Objective
from trainfluence.solvers import make_solver
from trainfluence.settings.influence import StoreSettings
from trainfluence.validation import example_losses, leave_one_out, proximal_response, refit


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def fit_to_optimum(model: nn.Module, data, wd: float) -> nn.Module:
    fm = FunctionalModel(model, "all")
    params = refit(fm, Objective(wd), data)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    return model


@pytest.fixture(scope="module")
def synthetic():
    """Well-conditioned L2-regularised 3-class logistic regression on 10 Gaussian features (float64)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 10, generator=g, dtype=torch.float64)
    teacher = torch.randn(10, 3, generator=g, dtype=torch.float64)
    y = (x @ teacher + 0.8 * torch.randn(300, 3, generator=g, dtype=torch.float64)).argmax(1)
    xt = torch.randn(5, 10, generator=g, dtype=torch.float64)
    yt = (xt @ teacher).argmax(1)
    torch.manual_seed(0)
    model = fit_to_optimum(nn.Linear(10, 3).double(), (x, y), 0.05)
    return {"model": model, "train": TensorSource(x, y), "test": TensorSource(xt, yt), "wd": 0.05}


@pytest.fixture(scope="module")
def synthetic_op(synthetic):
    fm = FunctionalModel(synthetic["model"], "all")
    return HessianOperator(fm, Objective(synthetic["wd"]), synthetic["train"], damping=0.0)


def test_hvp_matches_dense_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,))
    fm = FunctionalModel(model, "all")
    obj = Objective(weight_decay=0.03)
    op = HessianOperator(fm, obj, TensorSource(x, y), damping=0.2, batch_size=16)

    def full_objective(theta):
        params = fm.unflatten(theta)
        return obj.loss(fm(params, x), y).mean() + obj.regularizer(params)

    H = hessian(full_objective)(fm.flat_params()) + 0.2 * torch.eye(fm.dim, dtype=torch.float64)
    V = torch.randn(7, fm.dim, dtype=torch.float64)
    assert torch.allclose(op.hvp(V), V @ H, atol=1e-10)
    assert torch.allclose(op.dense(progress=False), H, atol=1e-10)
    assert op.top_eigenvalue(iterations=500, tol=1e-10) == pytest.approx(float(torch.linalg.eigvalsh(H).abs().max()), rel=1e-4)


@pytest.mark.parametrize("name,settings", [
    ("exact", None), ("cg", {"rtol": 1e-10}), ("cg", {"rtol": 1e-10, "preconditioner": "none"}),
    ("arnoldi", {"rank": 33}), ("lissa", {"tol": 1e-9}), ("lissa", {"tol": 1e-9, "preconditioner": "kfac"}),
    ("lissa", {"tol": 1e-9, "preconditioner": "none", "depth": 20000})])
def test_solvers_match_linalg_solve(synthetic, synthetic_op, name, settings):
    """Every iterative solver converges to torch.linalg.solve's answer when asked for a tight tolerance (LiSSA
    included: its batch grows to the full data, after which each step is exact)."""
    op = synthetic_op
    H = op.dense(progress=False)
    V = torch.randn(4, op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = torch.linalg.solve(H, V.T).T
    solver = make_solver(name, settings)
    got = solver.inverse_hvp(op, V)
    assert solver.report is not None and solver.report.converged
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-9), (got - want).abs().max()


def test_arnoldi_low_rank_is_exact_on_its_subspace(synthetic_op):
    op = synthetic_op
    evals, evecs = torch.linalg.eigh(op.dense(progress=False))
    solver = make_solver("arnoldi", {"rank": 5})
    mu, U = solver.eigenpairs(op)
    assert torch.allclose(mu, evals.flip(0)[:5], rtol=1e-6)
    v = evecs[:, -2]  # an eigenvector inside the top-5 subspace
    assert torch.allclose(solver.inverse_hvp(op, v[None])[0], v / evals[-2], atol=1e-8)


def test_lissa_stops_on_its_residual_and_grows_its_batch(synthetic):
    """Classic LiSSA (no preconditioner) with 8-example batches on a problem whose curvature is mostly data (no
    weight decay): the residual stalls at the minibatch noise floor, the batch doubles until it stops stalling, and
    the recursion stops as soon as ‖g − Hx‖/‖g‖ ≤ tol — measured exactly here, the held examples being all 300."""
    fm = FunctionalModel(synthetic["model"], "all")
    op = HessianOperator(fm, Objective(0.0), synthetic["train"], damping=0.02)
    solver = make_solver("lissa", {"tol": 1e-6, "depth": 20000, "preconditioner": "none", "batch_size": 8})
    g = torch.randn(2, op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x = solver.inverse_hvp(op, g)
    report, trace = solver.report, solver.trace
    assert report.converged and report.value <= 1e-6
    assert float(((g - op.hvp(x)).norm(dim=1) / g.norm(dim=1)).max()) == pytest.approx(report.value, rel=1e-6)
    batches = [t["batch"] for t in trace]
    assert batches == sorted(batches) and batches[0] == 8 and batches[-1] > 8  # grew when it stalled
    assert solver.scale_used == pytest.approx(1.5 * op.top_eigenvalue(), rel=2e-2)


def test_lissa_divergence_names_the_scale(synthetic_op):
    top = synthetic_op.top_eigenvalue()
    solver = make_solver("lissa", {"scale": top / 4, "depth": 3000, "preconditioner": "none", "tol": 1e-12})
    g = torch.randn(1, synthetic_op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with pytest.raises(UserError, match=r"LiSSA diverged .* a larger --lissa-scale"):
        solver.inverse_hvp(synthetic_op, g)


def test_lissa_divergence_names_the_damping():
    # a saddle: the loss 0.5·θᵀAθ with A indefinite, expressed as a one-example "model"
    class Saddle(nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = nn.Parameter(torch.zeros(2, dtype=torch.float64))

        def forward(self, x):
            q = 0.5 * (self.theta[0] ** 2 - 0.5 * self.theta[1] ** 2)
            return torch.stack([q.expand(len(x)), torch.zeros(len(x), dtype=torch.float64)], 1)

    class Identity(Objective):
        def loss(self, outputs, targets):
            return outputs[:, 0]

    fm = FunctionalModel(Saddle(), "all")
    op = HessianOperator(fm, Identity(), TensorSource(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long)), damping=0.1)
    with pytest.raises(UserError, match=r"damping above 0\.5 "):
        make_solver("lissa", {"depth": 3000, "scale": 2.0, "preconditioner": "none"}).inverse_hvp(
            op, torch.ones(1, 2, dtype=torch.float64))


def test_exact_solver_refuses_only_what_would_not_fit():
    fm = FunctionalModel(build_model("cnn", 5, 3, 32), "all")
    op = HessianOperator(fm, Objective(), TensorSource(torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)), 0.1)
    need = 24 * fm.dim**2 / 2**30  # 49,525 parameters: about 55 GiB
    with pytest.raises(UserError, match=rf"needs about {need:.1f} GiB .* above the 1\.0 GiB it may use"):
        make_solver("exact", {"max_memory_gb": 1.0}).inverse_hvp(op, torch.zeros(1, fm.dim))


def test_self_influence_agrees_across_solvers(synthetic, tmp_path):
    kwargs = dict(damping=0.0, weight_decay=synthetic["wd"], cache_dir=tmp_path)
    exact = InfluenceEngine(synthetic["model"], synthetic["train"], solver="exact", **kwargs)
    si = exact.self_influence()
    assert si.shape == (300,) and (si > 0).all()
    G = exact.gradients(synthetic["train"]).double()
    H = exact.operator.dense(progress=False)
    want = (G * torch.linalg.solve(H, G.T).T).sum(1).numpy()
    np.testing.assert_allclose(si, want, rtol=1e-6)
    # a pass takes as many rows per step as the memory budget holds (4 float32 copies): the same scores in any steps
    np.testing.assert_allclose(exact.self_influence(chunk=7), si, rtol=1e-12)
    assert rows_within(11_171_397, 1 << 30) == 6 and rows_within(49_418, 1 << 30) == 1024 and rows_within(10**12) == 1
    arnoldi = InfluenceEngine(synthetic["model"], synthetic["train"], solver="arnoldi", solver_settings={"rank": 33}, **kwargs)
    np.testing.assert_allclose(arnoldi.self_influence(), want, rtol=1e-6)
    cg = InfluenceEngine(synthetic["model"], synthetic["train"], solver="cg", **kwargs)
    np.testing.assert_allclose(cg.self_influence(np.arange(5)), want[:5], rtol=1e-4)


def test_params_influence_is_the_derivative_of_the_optimum(synthetic, tmp_path):
    """I_up,params(z) = dθ̂/dε for L + εℓ(z): compare with a re-fit at small ε."""
    engine = InfluenceEngine(synthetic["model"], synthetic["train"], solver="exact", damping=0.0,
                             weight_decay=synthetic["wd"], cache_dir=tmp_path)
    i, n, delta = 17, 300, 0.02
    predicted = engine.params_influence([i])[0]
    w = torch.ones(n, dtype=torch.float64)
    w[i] += delta  # (1/n)·(1 + δ)·ℓ(z) = ℓ(z)/n + ε ℓ(z) with ε = δ/n
    fm = engine.fm
    moved = fm.flatten(refit(fm, engine.objective, synthetic["train"], weights=w)) - fm.flat_params()
    actual = moved / (delta / n)
    assert float(cosine(predicted, actual)) > 0.999
    assert float(predicted.norm() / actual.norm()) == pytest.approx(1.0, abs=0.02)


@pytest.fixture(scope="module")
def shapes_logreg():
    """L2-regularised logistic regression on 16×16 shapes, fitted to its optimum (float64)."""
    cfg = DataConfig("shapes", image_size=16, train_size=500, test_size=50)
    train, test = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    torch.manual_seed(0)
    model = fit_to_optimum(build_model("logreg", 5, 3, 16).double(), train, 0.5)
    return {"model": model, "train": train, "test": test, "wd": 0.5}


def test_leave_one_out_retraining(shapes_logreg, tmp_path):
    d = shapes_logreg
    engine = InfluenceEngine(d["model"], d["train"], solver="cg", damping=0.0, weight_decay=d["wd"],
                             solver_settings={"rtol": 1e-10}, cache_dir=tmp_path)
    fm, obj = engine.fm, engine.objective
    x, y = d["test"].tensors()
    with torch.no_grad():
        losses = obj.loss(fm(fm.params, x), y)
    t = int(losses.argmax())  # a test point the model gets wrong: large influences
    test = (x[t : t + 1], y[t : t + 1])
    infl = engine.influence(test)[0]
    top = np.argsort(-np.abs(infl))[:30]
    predicted = -infl[top] / engine.n
    actual = leave_one_out(fm, obj, d["train"], test, top)[:, 0]
    r = pearsonr(predicted, actual)[0]
    assert r >= 0.95, (r, predicted[:5], actual[:5])
    assert np.sign(predicted).tolist() == np.sign(actual).tolist()
    # the scale is right too: first-order influence under-estimates high-leverage removals a little (ratio ≥ 1)
    slope = float(actual @ predicted / (predicted @ predicted))
    assert 0.9 < slope < 2.0


def test_leave_one_out_baseline_is_refit_not_checkpoint(synthetic):
    """Started away from the optimum, the change must be optimum-without-z minus optimum, not minus the start."""
    model = copy.deepcopy(synthetic["model"])
    with torch.no_grad():
        model.weight[0].add_(0.5)  # a checkpoint that is not the optimum (one class row: softmax is shift-invariant)
    fm, obj = FunctionalModel(model, "all"), Objective(synthetic["wd"])
    test, removed = synthetic["test"], np.array([3, 17])
    actual = leave_one_out(fm, obj, synthetic["train"], test, removed)
    optimum = FunctionalModel(synthetic["model"], "all")
    base = example_losses(optimum, obj, optimum.params, test)
    for row, i in enumerate(removed):
        w = torch.ones(300, dtype=torch.float64)
        w[i] = 0.0
        without = example_losses(optimum, obj, refit(optimum, obj, synthetic["train"], weights=w), test)
        np.testing.assert_allclose(actual[row], without - base, atol=1e-7)
    start = example_losses(fm, obj, fm.params, test)
    assert np.abs(base - start).max() > 1e-2  # the checkpoint as baseline would be far off


def test_duplicate_is_most_helpful_and_flipped_copy_harmful(shapes_logreg, tmp_path):
    d = shapes_logreg
    xs, ys = d["train"].tensors()
    xt, yt = d["test"].tensors(slice(0, 3))
    # append one exact duplicate and one label-flipped copy of each of three test images
    flipped = (yt + 2) % 5
    train = TensorSource(torch.cat([xs, xt, xt]), torch.cat([ys, yt, flipped]))
    torch.manual_seed(0)
    model = fit_to_optimum(build_model("logreg", 5, 3, 16).double(), train, d["wd"])
    engine = InfluenceEngine(model, train, solver="exact", damping=0.0, weight_decay=d["wd"], cache_dir=tmp_path)
    top = engine.top_k((xt, yt), top=5)
    n = len(xs)
    for j in range(3):
        assert top.helpful_index[j, 0] == n + j  # the duplicate of test point j ranks first among helpful
        assert n + 3 + j in top.harmful_index[j, :3]  # its flipped copy is among the 3 most harmful
        assert top.helpful_score[j, 0] < 0 < top.harmful_score[j, 0]


def test_top_k_equals_sorting_the_influence_matrix(shapes_run, tmp_path):
    train = load_dataset(DataConfig("shapes", train_size=300, test_size=20), "train")
    test = load_dataset(DataConfig("shapes", train_size=300, test_size=20), "test")
    engine = InfluenceEngine(shapes_run["checkpoint"], train, solver="exact", params="last", damping=0.01,
                             cache_dir=tmp_path)
    assert engine.objective.weight_decay == 5e-4  # read from the checkpoint
    matrix = engine.influence(test)
    top = engine.top_k(test, top=5)
    np.testing.assert_allclose(top.helpful_score, np.sort(matrix, axis=1)[:, :5], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(top.harmful_score, -np.sort(-matrix, axis=1)[:, :5], rtol=1e-4, atol=1e-6)
    assert (np.take_along_axis(matrix, top.helpful_index, 1) == pytest.approx(top.helpful_score, rel=1e-4, abs=1e-6))


def test_projected_scores_match_exact_scores(shapes_run, tmp_path):
    """The projected store preserves gradient inner products: with a large damping s_test is nearly the test
    gradient itself, and the rankings from a store projected to 4,096 of 49,525 dimensions match the full ones.
    (With little damping s_test leans on low-curvature directions, which a gradient-energy allocation sketches
    hardest: the LDS benchmark measures how much that costs.)"""
    train = load_dataset(DataConfig("shapes", train_size=500, test_size=20), "train")
    x, y = load_dataset(DataConfig("shapes", train_size=500, test_size=20), "test").tensors(slice(0, 3))
    common = dict(solver="ekfac", damping=100.0, params="all", cache_dir=tmp_path)
    full = InfluenceEngine(shapes_run["checkpoint"], train, **common)
    projected = InfluenceEngine(shapes_run["checkpoint"], train, projection_dim=4096, **common)
    a, b = full.influence((x, y)), projected.influence((x, y))
    assert projected.store.dim == 4096 and full.store.dim == full.fm.dim
    for row_a, row_b in zip(a, b):
        assert spearmanr(row_a, row_b)[0] >= 0.95


def test_scores_invariant_to_batching_chunking_and_shards(shapes_run, tmp_path):
    train = load_dataset(DataConfig("shapes", train_size=200, test_size=20), "train")
    test = load_dataset(DataConfig("shapes", train_size=200, test_size=20), "test")
    from trainfluence.checkpoint import load_checkpoint

    model = load_checkpoint(shapes_run["checkpoint"]).model.double()  # float64, so only real differences show
    base = dict(solver="exact", params="classifier", damping=0.05, weight_decay=5e-4)
    ref = InfluenceEngine(model, train, cache_dir=tmp_path / "a", **base).influence(test)
    other = InfluenceEngine(model, train, cache_dir=tmp_path / "b", hessian_batch_size=37,
                            store=StoreSettings(params="classifier", chunk_size=30, memory_budget_mb=4),
                            **{k: v for k, v in base.items() if k != "params"})
    assert other.computer.batch_size(train.tensors([0])[0][0]) < 64  # a different vmap batch really was used
    sharded = InfluenceEngine(model, train, cache_dir=tmp_path / "c", **base)
    for i in range(3):
        sharded.build_cache(shard=(i, 3))
    # the stored gradients are float32: scores agree to float32 rounding
    np.testing.assert_allclose(other.influence(test), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    np.testing.assert_array_equal(sharded.influence(test), ref)  # shards: the very same bytes


def test_s_test_cached_beside_store(synthetic, tmp_path):
    engine = InfluenceEngine(synthetic["model"], synthetic["train"], solver="cg", damping=0.0,
                             weight_decay=synthetic["wd"], cache_dir=tmp_path)
    first = engine.s_test(synthetic["test"])
    assert not list(tmp_path.glob("grads-*"))  # s_test needs the Hessian's data, not a gradient store
    files = list(tmp_path.glob("stest-*/*.npy"))
    assert len(files) == 1
    # prove the second call reads the file: a copy that matches its checksum is used ...
    from trainfluence.files import npy_writer, save_verified

    save_verified(files[0], npy_writer(np.full_like(np.load(files[0]), 7.0)))
    assert torch.equal(engine.s_test(synthetic["test"]), torch.full_like(first, 7.0))
    # ... an edited one is not: it is solved again
    np.save(files[0], np.full_like(np.load(files[0]), 8.0))
    assert torch.allclose(engine.s_test(synthetic["test"]), first)
    assert engine.reports and all(r.converged for r in engine.reports)
    other = InfluenceEngine(synthetic["model"], synthetic["train"], solver="cg", damping=0.5,
                            weight_decay=synthetic["wd"], cache_dir=tmp_path)
    assert not torch.allclose(other.s_test(synthetic["test"]), first)  # other settings: another cache entry
    assert len(list(tmp_path.glob("stest-*/*.npy"))) == 2


def test_s_test_in_memory_bounded_steps(synthetic, tmp_path, monkeypatch):
    """s_test takes as many test points per step as the memory budget holds (one step for a small model); solved in
    steps of 2 the rows are those of one solve, and when one step did not converge the cached result says so even
    if the last step did."""
    import dataclasses

    import trainfluence.influence as influence_module

    kwargs = dict(damping=0.0, weight_decay=synthetic["wd"])
    whole = InfluenceEngine(synthetic["model"], synthetic["train"], solver="exact", cache_dir=tmp_path / "a",
                            **kwargs).s_test(synthetic["test"])
    monkeypatch.setattr(influence_module, "rows_within", lambda dim, budget: 2)
    stepped = InfluenceEngine(synthetic["model"], synthetic["train"], solver="exact", cache_dir=tmp_path / "b", **kwargs)
    torch.testing.assert_close(stepped.s_test(synthetic["test"]), whole, rtol=1e-12, atol=0)
    cg = InfluenceEngine(synthetic["model"], synthetic["train"], solver="cg", cache_dir=tmp_path / "c", **kwargs)
    solve, calls = cg.solver.inverse_hvp, []

    def first_step_unconverged(op, V):  # CG converges on every step here; the first one is made to report otherwise
        out = solve(op, V)
        calls.append(len(V))
        if len(calls) == 1:
            cg.solver.report = dataclasses.replace(cg.solver.report, converged=False)
        return out

    monkeypatch.setattr(cg.solver, "inverse_hvp", first_step_unconverged)
    cg.s_test(synthetic["test"])
    assert calls == [2, 2, 1] and [r.converged for r in cg.reports] == [False, True, True]
    cached = InfluenceEngine(synthetic["model"], synthetic["train"], solver="cg", cache_dir=tmp_path / "c", **kwargs)
    cached.s_test(synthetic["test"])  # read from the cache
    assert len(cached.reports) == 1 and not cached.reports[0].converged


def test_three_line_api(shapes_run, tmp_path):
    import trainfluence

    train = load_dataset(DataConfig("shapes", train_size=150, test_size=10), "train")
    test = load_dataset(DataConfig("shapes", train_size=150, test_size=10), "test")
    engine = trainfluence.InfluenceEngine(shapes_run["checkpoint"], train, solver="arnoldi", damping=0.01,
                                          params="last", projection_dim=None, cache_dir=tmp_path, weight_decay=None,
                                          solver_settings={"rank": 40})
    engine.build_cache()
    scores = engine.influence(test)
    assert scores.shape == (10, 150) and np.isfinite(scores).all()
    top = engine.top_k(test, 3)
    assert top.helpful_index.shape == (10, 3)
    si = engine.self_influence()
    assert si.shape == (150,) and (si >= 0).all()


def test_proximal_response_is_what_ggn_influence_predicts_away_from_an_optimum(tmp_path):
    """A ReLU net stopped early (not stationary): influence with the Gauss–Newton curvature is the first-order
    proximal Bregman response (validation module), checked against that objective minimised independently."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g, dtype=torch.float64)
    teacher = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = (torch.tanh(x) @ teacher + 0.5 * torch.randn(200, 3, generator=g, dtype=torch.float64)).argmax(1)
    xt = torch.randn(1, 8, generator=g, dtype=torch.float64)
    yt = (torch.tanh(xt) @ teacher).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    train = TensorSource(x, y)
    engine = InfluenceEngine(model, train, solver="exact", damping=0.01, weight_decay=0.01, curvature="ggn",
                             cache_dir=tmp_path)
    infl = engine.influence((xt, yt))[0]
    top = np.argsort(-np.abs(infl))[:20]
    predicted = -infl[top] / engine.n
    # the derivative: a hundredth of each example removed, the change scaled back up
    small = proximal_response(engine.fm, engine.objective, train, (xt, yt), top, engine.damping, fraction=0.01)[:, 0] / 0.01
    assert pearsonr(predicted, small)[0] > 0.999
    assert float(small @ predicted / (predicted @ predicted)) == pytest.approx(1.0, abs=0.02)
    # whole removals differ from it by the second-order terms only (0.97 measured)
    whole = proximal_response(engine.fm, engine.objective, train, (xt, yt), top, engine.damping)[:, 0]
    assert pearsonr(predicted, whole)[0] > 0.95
