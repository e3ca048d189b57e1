"""Random projection: unbiased inner products within the derived Johnson–Lindenstrauss-scale bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainfluence.gradients import GradientComputer
from trainfluence.objective import FunctionalModel, Objective
from trainfluence.projection import ProjectionSpec, Projector, allocate


@pytest.fixture(scope="module")
def real_gradients(shapes_run):
    from trainfluence.checkpoint import load_checkpoint

    model = load_checkpoint(shapes_run["checkpoint"]).model
    x, y = shapes_run["train"].tensors(slice(0, 48))
    fm = FunctionalModel(model, "all")
    return fm, GradientComputer(fm, Objective()).flat(x, y).double()


def countsketch_variance(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """Exact Var⟨Pa, Pb⟩ of one CountSketch into k buckets (module docstring of trainfluence.projection)."""
    return ((a * a).sum() * (b * b).sum() + (a @ b) ** 2 - 2 * ((a * a) * (b * b)).sum()) / k


@pytest.mark.parametrize("allocation", ["uniform", "energy"])
@pytest.mark.parametrize("k", [1024, 4096])
def test_inner_products_within_bound_on_real_gradients(real_gradients, k, allocation):
    """What the sketch guarantees is a variance: E[(⟨Pa, Pb⟩ − ⟨a, b⟩)²] ≤ σ²(a, b).  So the mean of (err/σ)² over
    pairs and over independent seeds is at most 1 in expectation; averaged over 16 seeds it concentrates, and we
    assert ≤ 1.5.  (One seed alone is one draw of a heavy-tailed quantity: on another CPU, whose rounding trains a
    slightly different model, a single seed's mean was seen at 1.79.)  Each pair also obeys Chebyshev with a
    union bound over all pairs and seeds at 1% failure probability."""
    fm, g = real_gradients
    energies = [float(b.pow(2).sum(1).mean()) for b in g[:16].split(fm.sizes, 1)]  # a pilot, as the store does
    dims = None if allocation == "uniform" else allocate(k, fm.sizes, energies)
    i, j = np.triu_indices(len(g), 1)
    exact = (g[i] * g[j]).sum(1)
    seeds, ratios = range(16), []
    # the bound depends on the block sizes and dims, not on the seed: computed once
    first = Projector(ProjectionSpec(k, seed=0, allocation=allocation), fm.sizes, block_dims=dims)
    sigma, norm_sigma = first.variance_bound(g[i], g[j]).sqrt(), first.variance_bound(g, g).sqrt()
    if allocation == "uniform":  # one block: σ = √(2/k)‖a‖‖b‖
        assert torch.allclose(sigma, np.sqrt(2 / k) * g[i].norm(dim=1) * g[j].norm(dim=1))
    for seed in seeds:
        proj = Projector(ProjectionSpec(k, seed=seed, allocation=allocation), fm.sizes, block_dims=dims)
        assert proj.dim == k
        pg = proj.project(g.float()).double()
        err = (pg[i] * pg[j]).sum(1) - exact
        chebyshev = np.sqrt(len(err) * len(seeds) / 0.01)
        assert bool((err.abs() <= chebyshev * sigma).all())
        # squared norms too (a = b)
        norm_err = (pg.pow(2).sum(1) - g.pow(2).sum(1)).abs() / norm_sigma
        assert float(norm_err.max()) <= np.sqrt(len(g) * len(seeds) / 0.01)
        ratios.append(float((err / sigma).pow(2).mean()))
    assert float(np.mean(ratios)) <= 1.5, ratios


def test_energy_allocation_beats_uniform_on_real_gradients(real_gradients):
    fm, g = real_gradients
    energies = [float(b.pow(2).sum(1).mean()) for b in g[:16].split(fm.sizes, 1)]
    dims = allocate(1024, fm.sizes, energies)
    uniform = Projector(ProjectionSpec(1024, allocation="uniform"), fm.sizes)
    energy = Projector(ProjectionSpec(1024), fm.sizes, block_dims=dims)
    i, j = np.triu_indices(len(g), 1)
    assert float(energy.variance_bound(g[i], g[j]).mean()) < 0.25 * float(uniform.variance_bound(g[i], g[j]).mean())


def test_allocate():
    sizes, energies = [10, 1000, 50, 5000], [5.0, 1.0, 1.0, 2.0]
    dims = allocate(200, sizes, energies)
    assert sum(dims) == 200 and all(1 <= d <= m for d, m in zip(dims, sizes))
    assert dims[0] == 10  # a high-energy small block is kept exact
    assert dims[3] == pytest.approx(2 * dims[1], abs=2) and dims[1] == pytest.approx(dims[2], abs=1)  # ∝ energy
    assert allocate(10_000, sizes, energies) == sizes  # k ≥ p: the identity
    assert sum(allocate(7, [100, 100, 100, 100], [1, 0, 0, 0])) == 7


def test_projection_unbiased_over_seeds():
    torch.manual_seed(0)
    a, b = torch.randn(3000).double(), torch.randn(3000).double()
    b = 0.6 * a + 0.8 * b
    k = 256
    vals = []
    for seed in range(300):
        p = Projector(ProjectionSpec(k, seed=seed, allocation="uniform"), [1000, 2000])
        pa, pb = p.project(torch.stack([a, b]).float()).double()
        vals.append(float(pa @ pb))
    vals = np.array(vals)
    sd = float(countsketch_variance(a, b, k).sqrt())
    assert abs(vals.mean() - float(a @ b)) < 4 * sd / np.sqrt(len(vals))
    assert 0.8 < vals.std() / sd < 1.2  # the exact variance formula


def test_project_blocks_equals_flat_and_any_vector():
    sizes = [10, 30, 7]
    for dims in (None, [10, 5, 3]):
        p = Projector(ProjectionSpec(16, seed=3), sizes, block_dims=dims)
        v = torch.randn(5, sum(sizes))
        assert torch.allclose(p.project(v), p.project_blocks(list(torch.split(v, sizes, 1))))
        u = torch.randn(sum(sizes))
        assert torch.allclose(p.project(2 * u + v[0]), 2 * p.project(u) + p.project(v[0]), atol=1e-5)  # linear
        assert torch.equal(Projector(ProjectionSpec(16, seed=3), sizes, block_dims=dims).project(v), p.project(v))
        assert not torch.equal(Projector(ProjectionSpec(16, seed=4), sizes, block_dims=dims).project(v), p.project(v))
    exact_first = Projector(ProjectionSpec(18, seed=0), sizes, block_dims=[10, 5, 3]).project(v)
    assert torch.equal(exact_first[:, :10], v[:, :10])  # a block given all its coordinates is copied


def test_gaussian_projection_option(real_gradients):
    fm, g = real_gradients
    k = 512
    proj = Projector(ProjectionSpec(k, seed=0, kind="gaussian", allocation="uniform"), fm.sizes)
    pg = proj.project(g[:12].float()).double()
    i, j = np.triu_indices(12, 1)
    err = (pg[i] * pg[j]).sum(1) - (g[i] * g[j]).sum(1)
    assert bool((err.abs() <= proj.variance_bound(g[i], g[j]).sqrt() * np.sqrt(len(err))).all())
