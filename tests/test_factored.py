"""The factored (LoGra) projection: from one batched forward/backward, equal to the dense Kronecker-structured
projection of the per-example gradients; unbiased, within its variance bound; usable as a gradient store."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainfluence.factored import FactoredProjector, factored_layout, factored_layers
from trainfluence.gradients import GradientComputer
from trainfluence.objective import FunctionalModel, Objective

from .nets import ViewNet


class Net(nn.Module):
    """Convolutions (padded, strided, dilated, with and without bias), BatchNorm (per-example gradients from the
    hooks), in-place ReLUs, a linear head and a free parameter (the per-example vmap fallback)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2, bias=False)
        self.fc = nn.Linear(8 * 4 * 4, 5)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 5))
        self.bn.running_var.copy_(torch.linspace(0.7, 1.6, 6))
        self.bn.running_mean.copy_(torch.linspace(-0.2, 0.3, 6))
        self.bn.weight.data.copy_(torch.linspace(0.8, 1.2, 6))

    def forward(self, x):
        x = F.relu(self.bn(self.c1(x)), inplace=True)
        x = F.relu(self.c2(x), inplace=True)
        return self.fc(x.flatten(1)) * self.scale


@pytest.fixture(scope="module")
def setup():
    model = Net().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 3, 8, 8, generator=g), torch.randint(0, 5, (24,), generator=g)
    fm = FunctionalModel(model, "all")
    grads = GradientComputer(fm, Objective()).flat(x, y)
    return fm, x, y, grads


def layout_for(fm: FunctionalModel, k: int) -> dict:
    return factored_layout(fm, k, {n: float(fm.params[n].numel()) for n in fm.names})


def test_factored_path_equals_the_dense_kronecker_projection(setup, monkeypatch):
    fm, x, y, grads = setup
    assert [layer.module for layer in factored_layers(fm)] == ["c1", "c2", "fc"]
    proj = FactoredProjector(fm, Objective(), layout_for(fm, 256), seed=3)
    assert proj.others == ["scale", "bn.weight", "bn.bias"]
    assert proj.norms == {"bn": ("bn.weight", "bn.bias")} and proj.vmapped == ["scale"]
    got, losses, logits = proj.per_example(x, y)
    # the in-place ReLUs after bn and c2 change their outputs: those two are recorded as copies, c1 and fc are not
    assert proj._copied == {"bn", "c2"}
    want = proj.project(grads)
    assert got.shape == want.shape == (24, proj.dim)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    with torch.no_grad():
        ref = fm.module(x)
    torch.testing.assert_close(logits, ref)
    torch.testing.assert_close(losses, F.cross_entropy(ref, y, reduction="none"))
    # a linear map, and the same matrices for the same seed
    torch.testing.assert_close(proj.project(2 * grads[:3] - grads[3:6]), 2 * want[:3] - want[3:6], rtol=1e-4, atol=1e-5)
    again = FactoredProjector(fm, Objective(), layout_for(fm, 256), seed=3)
    torch.testing.assert_close(again.project(grads), want)
    # the CPU pass runs channels-last (the module docstring); the default layout gives the same numbers
    assert proj.channels_last and all(p.is_contiguous() for p in fm.params.values())  # fm untouched
    import trainfluence.factored as factored_module

    monkeypatch.setattr(factored_module, "channels_last_params", lambda fm, has_conv: {})
    plain = FactoredProjector(fm, Objective(), layout_for(fm, 256), seed=3)
    assert not plain.channels_last
    torch.testing.assert_close(plain.per_example(x, y)[0], got, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_factored_pass_falls_back_to_the_default_layout(setup):
    _, x, y, _ = setup
    fm = FunctionalModel(ViewNet(channels=3, size=8, classes=5).eval(), "all")
    proj = FactoredProjector(fm, Objective(), layout_for(fm, 64), seed=0)
    assert proj.channels_last
    got = proj.per_example(x, y)[0]
    assert not proj.channels_last  # the view failed once; this projector keeps the default layout from then on
    want = proj.project(GradientComputer(fm, Objective()).flat(x, y))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_factored_inner_products_unbiased_within_their_bound(setup):
    """E⟨Pa, Pb⟩ = ⟨a, b⟩ and Var ≤ Σ_layers (2/k_out + 2/k_in + 4/(k_out k_in))‖A‖²‖B‖² (module docstring): the
    mean of (error/σ)² over pairs and 24 seeds is at most 1 in expectation (asserted ≤ 1.5), and the mean error
    is small against σ/√(pairs·seeds)."""
    fm = FunctionalModel(nn.Sequential(nn.Flatten(), nn.Linear(48, 20), nn.ReLU(), nn.Linear(20, 5)).eval(), "all")
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 3, 4, 4, generator=g), torch.randint(0, 5, (16,), generator=g)
    grads = GradientComputer(fm, Objective()).flat(x, y).double()
    layout = layout_for(fm, 96)
    i, j = np.triu_indices(len(grads), 1)
    exact = (grads[i] * grads[j]).sum(1)
    proj0 = FactoredProjector(fm, Objective(), layout, seed=0)
    sigma2 = torch.zeros(len(i), dtype=torch.float64)
    offsets = dict(zip(fm.names, np.cumsum([0] + fm.sizes)[:-1]))
    for layer in proj0.layers:
        cols = [n for n in (layer.weight, layer.bias) if n]
        idx = np.concatenate([np.arange(offsets[n], offsets[n] + fm.params[n].numel()) for n in cols])
        norm2 = grads[:, idx].pow(2).sum(1)
        sigma2 += FactoredProjector.variance_factor(layer) * norm2[i] * norm2[j]
    sigma = sigma2.sqrt()
    errors, ratios = [], []
    for seed in range(24):
        pg = FactoredProjector(fm, Objective(), layout, seed=seed).project(grads.float()).double()
        err = (pg[i] * pg[j]).sum(1) - exact
        errors.append(err)
        ratios.append(float((err / sigma).pow(2).mean()))
    assert float(np.mean(ratios)) <= 1.5, ratios
    mean_err = torch.stack(errors).mean(0)
    assert float((mean_err / sigma).abs().mean()) < 4 / np.sqrt(24)


def test_kronecker_store_and_influence(setup, tmp_path):
    from scipy.stats import spearmanr

    from trainfluence.influence import InfluenceEngine

    fm, x, y, grads = setup
    common = dict(solver="ekfac", damping=0.1, weight_decay=0.0, params="all", cache_dir=tmp_path)
    model = Net().eval()  # the same weights (seeded) as the fixture's
    full = InfluenceEngine(model, (x, y), **common)
    factored = InfluenceEngine(model, (x, y), projection_dim=2048, projection="kronecker", **common)
    store = factored.build_cache()
    assert store.projection.kind == "kronecker" and store.manifest["factored_layout"]
    a, b = full.influence((x[:3], y[:3])), factored.influence((x[:3], y[:3]))
    for row_a, row_b in zip(a, b):
        assert spearmanr(row_a, row_b)[0] > 0.9
