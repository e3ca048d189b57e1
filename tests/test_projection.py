"""Random projection: unbiased inner products within the derived Johnson–Lindenstrauss-scale bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainfluence.gradients import GradientComputer
from trainfluence.objective import FunctionalModel, Objective
from trainfluence.projection import ProjectionSpec, Projector


@pytest.fixture(scope="module")
def real_gradients(shapes_run):
    from trainfluence.checkpoint import load_checkpoint

    model = load_checkpoint(shapes_run["checkpoint"]).model
    x, y = shapes_run["train"].tensors(slice(0, 48))
    fm = FunctionalModel(model, "all")
    return fm, GradientComputer(fm, Objective()).flat(x, y).double()


def countsketch_variance(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """Exact Var⟨Pa, Pb⟩ of a CountSketch (module docstring of trainfluence.projection)."""
    return ((a * a).sum() * (b * b).sum() + (a @ b) ** 2 - 2 * ((a * a) * (b * b)).sum()) / k


@pytest.mark.parametrize("k", [1024, 4096])
def test_countsketch_inner_products_within_bound(real_gradients, k):
    fm, g = real_gradients
    proj = Projector(ProjectionSpec(k, seed=11), fm.sizes)
    pg = proj.project(g.float()).double()
    i, j = np.triu_indices(len(g), 1)
    exact = (g[i] * g[j]).sum(1)
    approx = (pg[i] * pg[j]).sum(1)
    norms = g.norm(dim=1)
    err = (approx - exact) / (norms[i] * norms[j])  # error in units of ‖a‖‖b‖
    # bound: |err| ≤ sqrt(2/(k δ)) with probability ≥ 1 − δ; with δ = 1/len(pairs) no pair may exceed it
    delta = 1.0 / len(err)
    assert float(err.abs().max()) <= np.sqrt(2 / (k * delta))
    # and the typical error is at the JL scale: RMS ≤ sqrt(2/k)
    assert float(err.pow(2).mean().sqrt()) <= np.sqrt(2 / k)
    # squared norms too (a = b)
    rel = (pg.pow(2).sum(1) - g.pow(2).sum(1)) / g.pow(2).sum(1)
    assert float(rel.abs().max()) <= np.sqrt(2 / (k * delta))


def test_projection_unbiased_over_seeds():
    torch.manual_seed(0)
    a, b = torch.randn(3000).double(), torch.randn(3000).double()
    b = 0.6 * a + 0.8 * b
    k = 256
    vals = []
    for seed in range(300):
        p = Projector(ProjectionSpec(k, seed=seed), [1000, 2000])
        pa, pb = p.project(torch.stack([a, b]).float()).double()
        vals.append(float(pa @ pb))
    vals = np.array(vals)
    sd = float(countsketch_variance(a, b, k).sqrt())
    assert abs(vals.mean() - float(a @ b)) < 4 * sd / np.sqrt(len(vals))
    assert 0.8 < vals.std() / sd < 1.2


def test_project_blocks_equals_flat_and_any_vector():
    sizes = [10, 30, 7]
    p = Projector(ProjectionSpec(16, seed=3), sizes)
    v = torch.randn(5, sum(sizes))
    assert torch.allclose(p.project(v), p.project_blocks(list(torch.split(v, sizes, 1))))
    # linear: P(αu + v) = αPu + Pv; and the same seed gives the same map
    u = torch.randn(sum(sizes))
    assert torch.allclose(p.project(2 * u + v[0]), 2 * p.project(u) + p.project(v[0]), atol=1e-5)
    assert torch.equal(Projector(ProjectionSpec(16, seed=3), sizes).project(v), p.project(v))
    assert not torch.equal(Projector(ProjectionSpec(16, seed=4), sizes).project(v), p.project(v))


def test_gaussian_projection_option(real_gradients):
    fm, g = real_gradients
    k = 512
    pg = Projector(ProjectionSpec(k, seed=0, kind="gaussian"), fm.sizes).project(g[:12].float()).double()
    i, j = np.triu_indices(12, 1)
    err = ((pg[i] * pg[j]).sum(1) - (g[i] * g[j]).sum(1)) / (g[i].norm(dim=1) * g[j].norm(dim=1))
    assert float(err.abs().max()) <= np.sqrt(2 / (k / len(err)))
