"""The Newton-step removal estimate checked against dense linear algebra and against retraining."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import jacrev

from trainfluence.data.source import TensorSource
from trainfluence.errors import UserError
from trainfluence.influence import InfluenceEngine
from trainfluence.objective import FunctionalModel, Objective
from trainfluence.removal import newton_removal
from trainfluence.validation import example_losses, refit


@pytest.fixture(scope="module")
def small():
    """3-class logistic regression on 6 Gaussian features, 40 examples (some nearly alone in their direction:
    large leverage), fitted to its optimum in float64."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64) * torch.linspace(0.3, 3.0, 40, dtype=torch.float64)[:, None]
    y = torch.randint(0, 3, (40,), generator=g)
    xt = torch.randn(4, 6, generator=g, dtype=torch.float64)
    yt = torch.randint(0, 3, (4,), generator=g)
    torch.manual_seed(0)
    model = nn.Linear(6, 3).double()
    wd = 0.02
    fm = FunctionalModel(model, "all")
    params = refit(fm, Objective(wd), (x, y), max_iter=500)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    return {"model": model, "train": TensorSource(x, y), "test": TensorSource(xt, yt), "wd": wd}


def test_newton_step_equals_the_dense_solve(small, tmp_path):
    """Δℓ_t = ∇ℓ_tᵀ (A − Gᵢ/n)⁻¹ gᵢ / n with A and Gᵢ formed densely from the full Jacobian (not by removal.py)."""
    damping = 1e-3
    engine = InfluenceEngine(small["model"], small["train"], solver="exact", damping=damping, weight_decay=small["wd"],
                             curvature="ggn", cache_dir=tmp_path)
    fm, n = engine.fm, engine.n
    x, y = small["train"].tensors()
    J = jacrev(lambda th: fm(fm.unflatten(th), x))(fm.flat_params())  # [n, K, p]
    p = torch.softmax(fm(fm.params, x), 1)
    Hf = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    Gi = torch.einsum("bkp,bkl,blq->bpq", J, Hf, J)
    A = Gi.mean(0) + (small["wd"] + damping) * torch.eye(fm.dim, dtype=torch.float64)
    g = engine.gradients(small["train"]).double()
    gt = engine.gradients(small["test"]).double()
    rows = np.arange(0, 40, 3)
    change, leverage = newton_removal(engine, small["test"], rows)
    want = np.stack([(gt @ torch.linalg.solve(A - Gi[i] / n, g[i]) / n).numpy() for i in rows], 1)
    np.testing.assert_allclose(change, want, rtol=1e-8, atol=1e-12)
    lev = [float(torch.linalg.eigvals(torch.linalg.solve(A, Gi[i])).real.max()) / n for i in rows]  # of A⁻¹Gᵢ/n
    np.testing.assert_allclose(leverage, lev, rtol=1e-8)
    assert (leverage < 1).all() and leverage.max() > 0.05


def test_newton_step_predicts_retraining_better_than_first_order(small, tmp_path):
    """On a convex model the removal is one Newton step from exact: for the ten highest-leverage examples the
    Newton estimate's error against actual retraining, summed over all pairs, is well under first order's."""
    engine = InfluenceEngine(small["model"], small["train"], solver="exact", damping=0.0, weight_decay=small["wd"],
                             cache_dir=tmp_path)
    n = engine.n
    _, leverage = newton_removal(engine, small["test"], np.arange(n))
    rows = np.argsort(-leverage)[:10]
    change, _ = newton_removal(engine, small["test"], rows)
    first = -engine.influence(small["test"])[:, rows] / n
    fm, obj = engine.fm, engine.objective
    base = example_losses(fm, obj, fm.params, small["test"])
    actual = np.empty_like(change)
    for col, i in enumerate(rows):
        w = torch.ones(n, dtype=torch.float64)
        w[i] = 0.0
        actual[:, col] = example_losses(fm, obj, refit(fm, obj, small["train"], weights=w, max_iter=500), small["test"]) - base
    newton_error, first_error = np.abs(change - actual).sum(), np.abs(first - actual).sum()
    assert newton_error < 0.4 * first_error  # measured: 0.85 against 2.91


def test_approximate_curvature_is_refused(small, tmp_path):
    engine = InfluenceEngine(small["model"], small["train"], solver="ekfac", damping=1e-3, weight_decay=small["wd"],
                             cache_dir=tmp_path)
    with pytest.raises(UserError, match="needs the curvature solved exactly"):
        engine.removal_effect(small["test"], [0, 1])


def test_leverage_above_one_under_sampled_curvature_gives_no_step(small, tmp_path):
    """H from a few sampled examples need not contain an unsampled image's own curvature: its leverage can exceed 1,
    where the step (nI − Mᵢ)⁻¹ does not exist. That column is NaN (explain then shows no number, only the leverage),
    never a finite value past the pole."""
    engine = InfluenceEngine(small["model"], small["train"], solver="exact", damping=0.0, weight_decay=small["wd"],
                             hessian_samples=3, cache_dir=tmp_path)
    change, leverage = newton_removal(engine, small["test"], np.arange(engine.n))
    above = leverage >= 1
    assert above.any() and (~above).any(), leverage
    assert np.isnan(change[:, above]).all() and np.isfinite(change[:, ~above]).all()
