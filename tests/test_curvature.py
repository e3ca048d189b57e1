"""Curvature: the Gauss–Newton product, the Kronecker-factored approximations (K-FAC, EK-FAC) checked against the
dense GGN, damping chosen from the spectrum, and ensembles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian, jacrev

from trainfluence.data.source import TensorSource
from trainfluence.errors import UserError
from trainfluence.ensemble import EnsembleEngine
from trainfluence.gradients import GradientComputer
from trainfluence.hvp import HessianOperator
from trainfluence.influence import InfluenceEngine
from trainfluence.kfac import KroneckerCurvature, leading_factors
from trainfluence.objective import FunctionalModel, Objective
from trainfluence.settings.influence import DAMPING_AUTO_FRACTION, KroneckerSettings
from trainfluence.solvers import make_solver
from trainfluence.solvers.exact import span_rank

from .nets import ViewNet


class ConvNet(nn.Module):
    """Strided, dilated and padded convolutions, BatchNorm (a diagonal block) and in-place ReLUs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 3, stride=2, dilation=1, padding=2, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)
        self.bn.running_var.fill_(1.5)
        self.bn.running_mean.fill_(0.1)

    def forward(self, x):
        x = F.relu(self.c1(x), inplace=True)
        x = F.relu(self.bn(self.c2(x)), inplace=True)
        return self.fc(x.flatten(1))


def exact_ggn(fm: FunctionalModel, x: torch.Tensor) -> torch.Tensor:
    """(1/n) Σᵢ Jᵢᵀ H_f Jᵢ over all of ``fm``'s parameters, from the full Jacobian (independent of kfac.py)."""
    J = jacrev(lambda th: fm(fm.unflatten(th), x))(fm.flat_params())  # [n, K, p]
    p = torch.softmax(fm(fm.params, x), 1)
    Hf = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("bkp,bkl,blq->pq", J, Hf, J) / len(x)


@pytest.fixture(scope="module")
def problem():
    model = ConvNet().double().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g)
    fm = FunctionalModel(model, "all")
    return {"model": model, "x": x, "y": y, "fm": fm, "ggn": exact_ggn(fm, x)}


def block_indices(fm: FunctionalModel, layer) -> np.ndarray:
    """Flat indices of a Kronecker layer's [out, in (+ bias)] matrix, row by row."""
    offsets = dict(zip(fm.names, np.cumsum([0] + fm.sizes)[:-1]))
    out = fm.params[layer.weight].shape[0]
    w = np.arange(offsets[layer.weight], offsets[layer.weight] + fm.params[layer.weight].numel()).reshape(out, -1)
    if layer.bias:
        w = np.concatenate([w, np.arange(offsets[layer.bias], offsets[layer.bias] + out)[:, None]], 1)
    return w.reshape(-1)


def test_ggn_product_is_the_gauss_newton_matrix(problem):
    op = HessianOperator(problem["fm"], Objective(0.03), TensorSource(problem["x"], problem["y"]), damping=0.2,
                         curvature="ggn", batch_size=16)
    V = torch.randn(5, op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    want = V @ (problem["ggn"] + 0.23 * torch.eye(op.dim, dtype=torch.float64))
    assert torch.allclose(op.hvp(V), want, atol=1e-11)


def test_exact_solver_in_the_data_span_equals_the_dense_solve(problem):
    """40 examples × (3 − 1) output factors < p: the exact solver works in the data's span (Gram matrix) and must
    give the dense (GGN + (wd + λ)I)⁻¹ to float64 rounding, including on vectors outside the span."""
    fm, x, y = problem["fm"], problem["x"], problem["y"]
    op = HessianOperator(fm, Objective(0.01), TensorSource(x, y), damping=1e-3, curvature="ggn", batch_size=16)
    assert span_rank(op) == 80 < fm.dim
    solver = make_solver("exact")
    V = torch.randn(5, fm.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = solver.inverse_hvp(op, V)
    assert solver.complement == pytest.approx(0.011) and solver.report.details["rank"] <= 80
    want = torch.linalg.solve(problem["ggn"] + 0.011 * torch.eye(fm.dim, dtype=torch.float64), V.T).T
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    quad = solver.quadratic_form(op, V)
    torch.testing.assert_close(quad, (V * want).sum(1), rtol=1e-9, atol=1e-12)
    with pytest.raises(UserError, match="singular"):
        make_solver("exact").inverse_hvp(HessianOperator(fm, Objective(0.0), TensorSource(x, y), 0.0, curvature="ggn"), V)


def test_ggn_equals_the_hessian_for_a_linear_model():
    torch.manual_seed(0)
    model = nn.Linear(6, 4).double()
    x, y = torch.randn(30, 6, dtype=torch.float64), torch.randint(0, 4, (30,))
    fm, obj = FunctionalModel(model, "all"), Objective(0.0)
    src = TensorSource(x, y)
    H = hessian(lambda th: obj.loss(fm(fm.unflatten(th), x), y).mean())(fm.flat_params())
    V = torch.randn(3, fm.dim, dtype=torch.float64)
    for curvature in ("ggn", "hessian"):
        assert torch.allclose(HessianOperator(fm, obj, src, 0.0, curvature=curvature).hvp(V), V @ H, atol=1e-12)


def test_ekfac_eigenvalues_are_the_exact_ggn_diagonal_in_its_basis(problem, monkeypatch):
    """EK-FAC's defining property: in the K-FAC eigenbasis Q_S ⊗ Q_A its eigenvalues are the exact diagonal of
    the GGN block, Λ* = diag(Qᵀ G Q) — for convolutions too, where K-FAC itself is only an approximation; the
    parameters outside Kronecker blocks (BatchNorm) get the exact diagonal of the GGN."""
    fm = problem["fm"]
    kc = KroneckerCurvature(fm, Objective()).fit(TensorSource(problem["x"], problem["y"]), np.arange(40), batch_size=7,
                                                 progress=False)
    assert [layer.module for layer in kc.layers] == ["c1", "c2", "fc"] and set(kc.diagonal) == {"bn.weight", "bn.bias"}
    kfac = KroneckerCurvature(fm, Objective(), corrected=False).fit(TensorSource(problem["x"], problem["y"]),
                                                                   np.arange(40), batch_size=40, progress=False)
    for layer, plain in zip(kc.layers, kfac.layers):
        idx = block_indices(fm, layer)
        Q = torch.kron(layer.QS, layer.QA)
        exact = torch.diagonal(Q.T @ problem["ggn"][np.ix_(idx, idx)] @ Q).reshape(layer.eig.shape)
        assert torch.allclose(layer.eig, exact, atol=1e-12), layer.module
        assert torch.allclose(plain.A, layer.A) and torch.allclose(plain.S, layer.S)  # same factors, batch-size free
        assert float((plain.eig - exact).abs().max()) > 1e-6  # K-FAC's own eigenvalues are an approximation
    derived = kc.uncorrected()  # K-FAC from EK-FAC's factors, no second pass: what a K-FAC fit gives
    assert not derived.corrected and all(torch.allclose(a.eig, b.eig, atol=1e-12) for a, b in zip(derived.layers, kfac.layers))
    V = torch.randn(3, fm.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(derived.solve(V, 0.05), kfac.solve(V, 0.05), atol=1e-9)
    assert float((derived.solve(V, 0.05) - kc.solve(V, 0.05)).abs().max()) > 1e-6  # and not EK-FAC's
    offsets = dict(zip(fm.names, np.cumsum([0] + fm.sizes)[:-1]))
    for name, d in kc.diagonal.items():
        i = np.arange(offsets[name], offsets[name] + d.numel())
        assert torch.allclose(d.flatten(), torch.diagonal(problem["ggn"])[i], atol=1e-12)
    # BatchNorm's diagonal came from the backward passes' hooks; the per-example vmap path (any other parameter
    # outside the Kronecker blocks) gives the same
    import trainfluence.kfac as kfac_module

    monkeypatch.setattr(kfac_module, "hooked_norms", lambda fm: {})
    by_vmap = KroneckerCurvature(fm, Objective(), corrected=False).fit(TensorSource(problem["x"], problem["y"]),
                                                                      np.arange(40), batch_size=16, progress=False)
    assert not by_vmap.norms and kc.norms == {"bn": ("bn.weight", "bn.bias")}
    for name, d in kc.diagonal.items():
        assert torch.allclose(by_vmap.diagonal[name], d, atol=1e-12)
    # the approximation P + dI, assembled densely, is what solve and whiten invert
    dense = torch.zeros(fm.dim, fm.dim, dtype=torch.float64)
    for layer in kc.layers:
        Q = torch.kron(layer.QS, layer.QA)
        dense[np.ix_(block_indices(fm, layer), block_indices(fm, layer))] = Q @ torch.diag(layer.eig.flatten()) @ Q.T
    for name, d in kc.diagonal.items():
        i = np.arange(offsets[name], offsets[name] + d.numel())
        dense[i, i] = d.flatten()
    dense += 0.05 * torch.eye(fm.dim, dtype=torch.float64)
    V = torch.randn(4, fm.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    want = torch.linalg.solve(dense, V.T).T
    assert torch.allclose(kc.solve(V, 0.05), want, atol=1e-10)
    assert torch.allclose(kc.whiten(V, 0.05).pow(2).sum(1), (V * want).sum(1), atol=1e-10)
    half = kc.inverse_sqrt(V, 0.05)
    assert torch.allclose(kc.inverse_sqrt(half, 0.05), want, atol=1e-10)
    # the mean eigenvalue is the GGN's (its trace / p): what damping "auto" scales
    assert float(kc.eigenvalues().mean()) == pytest.approx(float(torch.trace(problem["ggn"])) / fm.dim, rel=1e-10)


def test_output_hessian_factors_are_a_minimal_factorisation():
    """K − 1 cotangents (H_f = diag(p) − ppᵀ has rank K − 1) whose outer products sum to H_f, largest first, for
    confident and uncertain outputs alike."""
    f = torch.cat([torch.randn(6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 3,
                   torch.tensor([[25.0, 0, 0, 0, 0, 0, 0]], dtype=torch.float64)])
    U = Objective().output_hessian_factors(f)
    assert U.shape == (6, 7, 7)
    p = torch.softmax(f, 1)
    Hf = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    torch.testing.assert_close(torch.einsum("cbk,cbl->bkl", U, U), Hf, rtol=0, atol=1e-14)
    norms = U.pow(2).sum(2)  # [K − 1, B]: the eigenvalues, in descending order
    assert bool((norms[:-1] >= norms[1:] - 1e-15).all())


def test_sampled_output_factors_estimate_the_output_hessian():
    """One cotangent u = p − e_y per example, y drawn from p: E[uuᵀ] = H_f.  Each entry of uuᵀ lies in [−1, 1], so
    the mean of N draws is within 5/√N of H_f (five standard deviations at most); the same seed draws the same."""
    f = torch.tensor([[2.0, -1.0, 0.5, 0.0, 3.0]], dtype=torch.float64)
    n = 40_000
    U = Objective().sampled_output_factors(f.repeat(n, 1), torch.Generator().manual_seed(0))
    assert U.shape == (1, n, 5)
    torch.testing.assert_close(U.sum(2), torch.zeros(1, n, dtype=torch.float64), rtol=0, atol=1e-15)
    p = torch.softmax(f[0], 0)
    Hf = torch.diag(p) - torch.outer(p, p)
    assert float((torch.einsum("bk,bl->kl", U[0], U[0]) / n - Hf).abs().max()) < 5 / n**0.5
    again = Objective().sampled_output_factors(f.repeat(n, 1), torch.Generator().manual_seed(0))
    assert torch.equal(U, again)


def test_kronecker_fit_with_sampled_labels_approaches_the_exact_fit(problem):
    """labels="sampled" (one backward pass per batch) estimates the same factors as the exact K − 1: over 2,000
    examples (the 40 repeated) its EK-FAC eigenvalues are within 15% and its solves within 5% of the exact fit's
    (measured 3–4% and 0.4–0.9%: Monte Carlo error ~ 1/√2000); the same seed fits the same, another does not."""
    torch.manual_seed(0)
    fm = FunctionalModel(nn.Sequential(nn.Flatten(), nn.Linear(72, 9), nn.Tanh(), nn.Linear(9, 3)).double().eval(), "all")
    x, y = problem["x"].repeat(50, 1, 1, 1), problem["y"].repeat(50)

    def fit(**kwargs) -> KroneckerCurvature:
        return KroneckerCurvature(fm, Objective(), **kwargs).fit(TensorSource(x, y), np.arange(len(x)), batch_size=128,
                                                                 progress=False)

    exact, sampled = fit(), fit(labels="sampled")
    V = torch.randn(4, fm.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for damping in (0.1, 1e-3):
        a, b = exact.solve(V, damping), sampled.solve(V, damping)
        assert float((a - b).norm() / a.norm()) < 0.05
    for a, b in zip(exact.layers, sampled.layers):
        assert float((a.eig - b.eig).norm() / a.eig.norm()) < 0.15
        assert not torch.allclose(a.eig, b.eig)  # an estimate, not the same numbers
    assert all(torch.equal(a.eig, b.eig) for a, b in zip(sampled.layers, fit(labels="sampled").layers))
    assert not torch.equal(sampled.layers[0].eig, fit(labels="sampled", seed=1).layers[0].eig)
    assert sampled.uncorrected().labels == "sampled"


def test_leading_factors_keep_the_fewest_that_hold_the_trace():
    """leading_factors: the first r eigen-directions of each example's H_f, r the fewest whose eigenvalues hold at
    least 1 − tol of the batch's trace; the rest are left out whole (a positive semi-definite remainder)."""
    g = torch.Generator().manual_seed(3)
    f = torch.randn(64, 10, dtype=torch.float64, generator=g) * 4  # peaked predictions, as a trained model's
    full = Objective().output_hessian_factors(f)
    lam = full.pow(2).sum((1, 2))  # [K − 1]: the batch's eigenvalue sums, largest first
    for tol in (0.5, 0.1, 0.01, 1e-4):
        U = leading_factors(Objective(), f, tol)
        r = len(U)
        assert torch.equal(U, full[:r])
        assert float(lam[:r].sum()) >= (1 - tol) * float(lam.sum())
        assert r == 1 or float(lam[: r - 1].sum()) < (1 - tol) * float(lam.sum())
        rest = torch.einsum("cbk,cbl->bkl", full[r:], full[r:])
        assert float(torch.linalg.eigvalsh(rest).min()) > -1e-12
    assert 1 < len(leading_factors(Objective(), f, 0.01)) < 9
    assert torch.equal(leading_factors(Objective(), f, 0.0), full)


def test_kronecker_fit_over_many_spread_classes_says_sampled_labels_take_one_pass(capsys):
    """With predictions spread over 20 classes the fit keeps all 19 directions (19 backward passes per batch) and
    says so once, naming the option that takes one; with 3 classes it says nothing."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, dtype=torch.float64, generator=g)
    for classes, said in ((20, True), (3, False)):
        fm = FunctionalModel(nn.Linear(12, classes).double().eval(), "all")
        with torch.no_grad():
            fm.params["weight"].mul_(0.01)  # near-uniform predictions
        kc = KroneckerCurvature(fm, Objective(), trace_tol=0.01).fit(
            TensorSource(x, torch.randint(0, classes, (64,), generator=g)), np.arange(64), batch_size=32, progress=False)
        err = capsys.readouterr().err
        assert kc.directions == classes - 1
        assert (err.count("--ekfac-labels sampled") == 1) if said else ("sampled" not in err)


def test_kronecker_fit_of_the_leading_factors_is_close_below_the_full_one(problem):
    """trace_tol = 0.01 (the default) against the full K − 1 factors: the left-out curvature is positive
    semi-definite, so EK-FAC's trace (Σᵢ Σ_c ‖Gᵢ,c‖², whatever the basis) can only fall, and it falls by little;
    solves within 5% (measured: 7–8 of 9 directions kept per batch, trace 0.993 of the full one, solves 0.2–0.3%
    apart)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(72, 9), nn.Tanh(), nn.Linear(9, 10)).double().eval()
    with torch.no_grad():
        model[3].weight.mul_(8)  # peaked predictions, so that some directions are left out
    fm = FunctionalModel(model, "all")
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(200, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 10, (200,), generator=g)

    def fit(tol: float) -> KroneckerCurvature:
        return KroneckerCurvature(fm, Objective(), trace_tol=tol).fit(TensorSource(x, y), np.arange(len(x)),
                                                                     batch_size=50, progress=False)

    full, lead = fit(0.0), fit(0.01)
    assert any(len(leading_factors(Objective(), model(x[i : i + 50]), 0.01)) < 9 for i in range(0, 200, 50))
    trace_full, trace_lead = float(full.eigenvalues().sum()), float(lead.eigenvalues().sum())
    assert trace_lead <= trace_full * (1 + 1e-12)
    assert trace_lead >= 0.95 * trace_full
    V = torch.randn(4, fm.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for damping in (0.1, 1e-3):
        a, b = full.solve(V, damping), lead.solve(V, damping)
        assert float((a - b).norm() / a.norm()) < 0.05
    assert lead.uncorrected().trace_tol == 0.01
    assert full.directions == 9 and 7 <= lead.directions <= 8  # backward passes per batch (7–8 measured)
    again = KroneckerCurvature(fm, Objective(), trace_tol=0.01)
    again.restore(lead.arrays())  # what the curvature cache keeps
    assert again.directions == lead.directions
    report = make_solver("ekfac")
    op = HessianOperator(fm, Objective(), TensorSource(x, y), damping=0.1, curvature="ggn", batch_size=50)
    report.curvature(op)
    text = report.report.describe()
    assert "approximation" in text and "200 examples" in text and "output directions per batch" in text


def _fit(model: nn.Module, problem, **kwargs) -> KroneckerCurvature:
    fm = FunctionalModel(model.double().eval(), "all")
    return KroneckerCurvature(fm, Objective(), **kwargs).fit(TensorSource(problem["x"], problem["y"]), np.arange(40),
                                                            batch_size=16, progress=False)


def test_ekfac_of_linear_layers_is_the_exact_ggn_diagonal_in_its_basis(problem):
    """The linear-layer paths (one position per example) against the dense GGN, as the convolutional ones are
    above: a Linear → Tanh → Linear network with biases."""
    torch.manual_seed(0)
    fm = FunctionalModel(nn.Sequential(nn.Flatten(), nn.Linear(72, 9), nn.Tanh(), nn.Linear(9, 3)).double().eval(), "all")
    ggn = exact_ggn(fm, problem["x"])
    kc = KroneckerCurvature(fm, Objective()).fit(TensorSource(problem["x"], problem["y"]), np.arange(40), batch_size=16,
                                                 progress=False)
    assert [layer.module for layer in kc.layers] == ["1", "3"] and not kc.diagonal
    for layer in kc.layers:
        idx = block_indices(fm, layer)
        Q = torch.kron(layer.QS, layer.QA)
        exact = torch.diagonal(Q.T @ ggn[np.ix_(idx, idx)] @ Q).reshape(layer.eig.shape)
        assert torch.allclose(layer.eig, exact, atol=1e-12), layer.module


def test_kronecker_fit_takes_the_batch_its_memory_budget_holds(problem):
    """The fit takes fewer examples per batch when the memory budget holds fewer, counted per example as
    batch_within's docstring states, and its factors and eigenvalues are the same sums.  ConvNet on 2×6×6, by hand:
    c1 T = 36, in = 2·9 + 1 = 19, out 3; c2 T = 16, in = 27, out 4; fc T = 1, in = 65.  Patches max 2·36·19 = 1,368;
    rotated 684 + 432 + 65 = 1,181 plus products max(3·3·19, 3·4·27) = 324 (not fc's: T = 1); activations (c1, c2,
    bn, fc outputs) 108 + 64 + 64 + 3 = 239, ×4.  2,461 float64 values = 19,688 bytes per example."""
    per_example = 8 * (4 * 239 + max(1368, 1181 + 324))
    source = TensorSource(problem["x"], problem["y"])
    op = HessianOperator(problem["fm"], Objective(), source, 0.1, memory_budget=5 * per_example + 1)
    small = op.kronecker(settings=KroneckerSettings(batch_size=16))
    assert small.batch_size == 5
    assert KroneckerCurvature(problem["fm"], Objective()).batch_within(problem["x"][0], per_example - 1) == 1
    whole = _fit(ConvNet(), problem)
    assert whole.batch_size == 16
    for a, b in zip(small.layers, whole.layers):
        for name in ("A", "S", "eig"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-12, atol=1e-14)
    for n in whole.diagonal:
        torch.testing.assert_close(small.diagonal[n], whole.diagonal[n], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("make, layouts", [(ConvNet, [True] * 3), (lambda: ViewNet(channels=2, size=6, classes=3),
                                                                   [True] + [False] * 3)],
                         ids=["convnet", "view-after-conv"])
def test_kronecker_fit_is_layout_free(problem, make, layouts, monkeypatch):
    """The fit's channels-last passes (and their fallback when the model's code needs the default layout: the
    first forward pass raises and is repeated) give the factors and EK-FAC eigenvalues that the default layout
    gives; and torch's eigendecomposition failing (as it does on some large rank-deficient factors) changes
    nothing: the LAPACK fallback gives the same decomposition."""
    import trainfluence.kfac as kfac_module

    used: list[bool] = []  # the layout of every forward pass of the K-FAC pass (3 batches; EK-FAC's follow)
    forward = kfac_module.KroneckerCurvature._forward
    monkeypatch.setattr(kfac_module.KroneckerCurvature, "_forward",
                        lambda self, x, layout, hooked: (used.append(bool(layout)), forward(self, x, layout, hooked))[1])
    got = _fit(make(), problem)
    assert used[: len(layouts)] == layouts
    monkeypatch.setattr(kfac_module, "channels_last_params", lambda fm, has_conv: {})
    want = _fit(make(), problem)
    for a, b in zip(got.layers, want.layers):
        for name in ("A", "S", "eig"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=1e-12)

    def fails(_matrix):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", fails)
    robust = _fit(make(), problem)
    ones = torch.ones(1, robust.fm.dim, dtype=torch.float64)
    for a, b in zip(robust.layers, want.layers):
        torch.testing.assert_close(a.eig, b.eig, rtol=0, atol=1e-12)
    torch.testing.assert_close(robust.solve(ones, 0.1), want.solve(ones, 0.1), rtol=1e-9, atol=1e-12)


class NormNet(nn.Module):
    """A GroupNorm (a diagonal block whose per-example gradients take the vmap path) between a bias-free
    convolution and a linear layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c = nn.Conv2d(2, 3, 3, bias=False)
        self.gn = nn.GroupNorm(1, 3)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(F.relu(self.gn(self.c(x))).flatten(1))


@pytest.mark.parametrize("make, selection", [
    (ConvNet, "all"),
    (ConvNet, ["c2.weight", "bn.weight", "bn.bias", "fc.weight"]),
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(72, 9), nn.Tanh(), nn.Linear(9, 3)), "all"),
    (NormNet, "all"),
], ids=["convnet", "some-parameters", "linear", "groupnorm"])
def test_example_quadratic_forms_equal_whitened_gradients(problem, make, selection):
    """gᵀP⁻¹g from one forward and one backward pass, no gradient formed, equals the whitened per-example gradient
    on every path: convolutions with T ≥ in (c1: 36 positions, 19 inputs) and T < in (c2: 16, 27), linear layers
    (one position), BatchNorm from hooks, GroupNorm by vmap, a selection of some parameters, and labels other
    than the given ones (the relabel suggestions)."""
    x, y = problem["x"], problem["y"]
    fm = FunctionalModel(make().double().eval(), selection)
    kc = KroneckerCurvature(fm, Objective()).fit(TensorSource(x, y), np.arange(40), batch_size=16, progress=False)
    assert kc.layers and (kc._vmapped == ["gn.weight", "gn.bias"]) == (make is NormNet)
    other = (y + 1) % 3
    for labels in (y, other):
        G = GradientComputer(fm, Objective()).flat(x, labels)
        want = kc.whiten(G, 0.05).pow(2).sum(1)
        got = kc.example_quadratic_forms(x, labels, 0.05)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


def test_kronecker_fit_is_kept_on_disk(problem, tmp_path, monkeypatch):
    """A second engine on the same model, data and settings loads the EK-FAC fit instead of fitting again, and
    gives the same H⁻¹v and self-influence bit for bit; other parameters fit their own; a damaged file is fitted
    again (a note, no traceback); arrays of another parameter selection are refused by restore."""
    x, y = problem["x"], problem["y"]
    fits = []
    real = KroneckerCurvature.fit
    monkeypatch.setattr(KroneckerCurvature, "fit", lambda self, *a, **k: fits.append(1) or real(self, *a, **k))

    def engine(**options):
        return InfluenceEngine(problem["model"], (x, y), solver="ekfac", damping=0.01, weight_decay=0.0,
                               cache_dir=tmp_path, **{"params": "all", **options})

    first = engine()
    G = first.gradients((x[:4], y[:4]))
    si, solved = first.self_influence(), first.inverse_hvp(G)
    (path,) = tmp_path.glob("kfac-*/fit.npz")
    assert len(fits) == 1
    second = engine()
    np.testing.assert_array_equal(second.self_influence(), si)
    torch.testing.assert_close(second.inverse_hvp(G), solved, rtol=0, atol=0)
    assert len(fits) == 1
    engine(params=["fc.weight", "fc.bias"]).self_influence()
    assert len(fits) == 2 and len(list(tmp_path.glob("kfac-*/fit.npz"))) == 2
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    np.testing.assert_allclose(engine().self_influence(), si, rtol=1e-12)
    assert len(fits) == 3
    last = KroneckerCurvature(FunctionalModel(problem["model"], ["fc.weight", "fc.bias"]), Objective())
    with pytest.raises(ValueError, match="do not match"):
        last.restore(second.solver.factored(second.operator).arrays())


def test_ekfac_solver_and_damping_auto(problem, tmp_path):
    x, y = problem["x"], problem["y"]
    engine = InfluenceEngine(problem["model"], (x, y), solver="ekfac", params="all", damping="auto", weight_decay=0.0,
                             cache_dir=tmp_path)
    want = DAMPING_AUTO_FRACTION * float(torch.trace(problem["ggn"])) / problem["fm"].dim
    assert engine.damping == pytest.approx(want, rel=1e-8)
    assert engine.describe()["damping"] == "auto"
    si = engine.self_influence()
    G = engine.gradients((x, y))
    direct = (engine.inverse_hvp(G).double() * G.double()).sum(1).numpy()
    np.testing.assert_allclose(si, direct, rtol=1e-8)  # whitening and solving agree
    assert len(engine.operator._kronecker) == 1  # λ came from the solver's own EK-FAC, fitted once
    # a K-FAC solver on a sample of the examples: λ from an EK-FAC on that same sample, K-FAC from its factors
    kfac = InfluenceEngine(problem["model"], (x, y), solver="kfac", params="all", damping="auto", weight_decay=0.0,
                           cache_dir=tmp_path / "kfac", solver_settings={"samples": 25})
    kfac.self_influence()
    fits = kfac.operator._kronecker
    fit = (25, 128, 0, "exact", 0.01)
    assert sorted(fits) == [(False, *fit), (True, *fit)] and fits[(True, *fit)].examples == 25


def test_ensemble_averages_its_members(problem, tmp_path):
    x, y = problem["x"], problem["y"]
    other = ConvNet().double().eval()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.1)
    options = dict(solver="exact", params="fc", damping=0.1, weight_decay=0.0, cache_dir=tmp_path)
    ensemble = EnsembleEngine([problem["model"], other], (x, y), **options)
    test = (x[:3], y[:3])
    single = [InfluenceEngine(m, (x, y), **options).influence(test) for m in (problem["model"], other)]
    np.testing.assert_allclose(ensemble.influence(test), (single[0] + single[1]) / 2, rtol=1e-6)
    top = ensemble.top_k(test, 4)
    mean = (single[0] + single[1]) / 2
    np.testing.assert_array_equal(top.helpful_index, np.argsort(mean, axis=1, kind="stable")[:, :4])
    np.testing.assert_allclose(ensemble.self_influence(), np.mean([InfluenceEngine(m, (x, y), **options).self_influence()
                                                                  for m in (problem["model"], other)], axis=0), rtol=1e-6)


def test_low_rank_factors_take_the_pivoted_cholesky_route_with_the_same_result(problem, monkeypatch):
    """An input factor summed over fewer rows than half its size is decomposed in O(d²r) (pivoted Cholesky, thin
    SVD, complete QR): the same eigenvalues, a complete orthonormal basis, and the same K-FAC and EK-FAC solves as
    the dense eigendecomposition."""
    import trainfluence.kfac as kfac_module
    from trainfluence.linalg import low_rank_psd_eigh, symmetric_eigh

    g = torch.Generator().manual_seed(0)
    for d, r in ((60, 7), (30, 0), (20, 20)):
        X = torch.randn(r, d, generator=g, dtype=torch.float64)
        M = X.T @ X
        values, Q = low_rank_psd_eigh(M)
        torch.testing.assert_close(Q.T @ Q, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close((Q * values) @ Q.T, M, rtol=0, atol=1e-10 * max(1.0, float(M.abs().max())))
        torch.testing.assert_close(values, torch.linalg.eigvalsh(M).clamp_min(0), rtol=0, atol=1e-10 * max(1.0, float(values.max())))
        assert (values[: d - r] == 0).all() and (values[d - r :] > 0).all()

    calls: list[int | None] = []

    def recorded(M, rank_bound=None):
        calls.append(rank_bound)
        return symmetric_eigh(M, rank_bound)

    mlp = lambda: nn.Sequential(nn.Flatten(), nn.Linear(72, 9), nn.Tanh(), nn.Linear(9, 3))  # noqa: E731
    source, rows = TensorSource(problem["x"], problem["y"]), np.arange(16)  # 16 rows: the 73 × 73 factor has rank ≤ 16
    for corrected in (False, True):
        fm = FunctionalModel(mlp().double().eval(), "all")
        fits = {}
        for route, eigh in (("low", recorded), ("dense", lambda M, rank_bound=None: symmetric_eigh(M))):
            monkeypatch.setattr(kfac_module, "symmetric_eigh", eigh)
            fits[route] = KroneckerCurvature(fm, Objective(), corrected=corrected).fit(source, rows, batch_size=8, progress=False)
        assert 16 in calls  # the first layer's input factor took the low-rank route
        low, dense = fits["low"], fits["dense"]
        V = torch.randn(3, fm.dim, generator=g, dtype=torch.float64)
        for damping in (0.1, 1e-3):
            torch.testing.assert_close(low.solve(V, damping), dense.solve(V, damping), rtol=1e-8, atol=1e-10)
