"""Dense linear algebra shared by the solvers and the Kronecker factors."""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch


def symmetric_eigh(M: torch.Tensor, rank_bound: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and orthonormal eigenvectors of a symmetric matrix, as ``torch.linalg.eigh``.

    ``rank_bound``: for a positive semi-definite M = Σᵢ aᵢaᵢᵀ over that many vectors (so rank M ≤ rank_bound); at
    most half of M's size, M is decomposed by :func:`low_rank_psd_eigh` instead, in O(d²r) rather than O(d³).

    torch's divide-and-conquer driver can fail to converge on large rank-deficient matrices with many (near-)
    repeated eigenvalues: seen on the input factor of resnet18's last 512-channel convolution estimated from 64
    images, a 4,608 × 4,608 matrix of rank 328 (torch 2.14 on the CPU; numpy's and scipy's drivers decompose the
    same matrix).  Then LAPACK's relatively robust representation driver (``syevr``, through scipy; numpy's
    driver for a batch [..., n, n]) on the CPU in float64 does it, and the result comes back in M's dtype and on its
    device."""
    if rank_bound is not None and M.ndim == 2 and rank_bound <= M.shape[0] // 2:
        return low_rank_psd_eigh(M)
    try:
        return torch.linalg.eigh(M)
    except torch.linalg.LinAlgError:
        matrix = M.detach().double().cpu().numpy()
        values, vectors = scipy.linalg.eigh(matrix, driver="evr") if matrix.ndim == 2 else np.linalg.eigh(matrix)
        return (torch.from_numpy(np.ascontiguousarray(values)).to(M.device, M.dtype),
                torch.from_numpy(np.ascontiguousarray(vectors)).to(M.device, M.dtype))


def low_rank_psd_eigh(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`symmetric_eigh` of a positive semi-definite d × d matrix of rank r ≪ d, in O(d²r).

    Pivoted Cholesky (LAPACK ``pstrf``, stopping at its default tolerance d·ε·max Mᵢᵢ) gives M = BBᵀ with B d × r;
    the thin SVD B = UΣVᵀ gives the nonzero eigenpairs M = UΣ²Uᵀ; a complete QR of U adds an orthonormal basis of
    the null space, whose eigenvalues are 0.  Eigenvalues below the tolerance come out as 0 (``torch.linalg.eigh``
    returns them as rounding-sized numbers of either sign).  Measured on torchvision's stock resnet18 (2 cores; its
    stride-2 stem and max-pool leave layer4 one position per 32 × 32 image — the product's small-image ``resnet18``
    leaves it 16, so 300 images give its 4,608-wide factors 4,800 outer products and the dense route, BENCHMARKS.md
    "bench:large_model"): the 4,608 × 4,608 input factors of its last convolutions, estimated from 32 images
    (numerical rank 310–318 in float64: the outer products are formed in float32, whose rounding lifts it above
    32), took 14–16 s each by ``torch.linalg.eigh`` (one of them failed to converge after 14 s, see
    :func:`symmetric_eigh`); from 300 random images this route took 1.4–2.1 s for each such factor against 15.5–27
    s for eigh.  On a synthetic factor of rank 318 its parts, timed one by one, took 0.6 s (pivoted Cholesky), 0.1
    s (SVD) and 0.6 s (QR), and it agreed with eigh's reconstruction to 1e-14 and its damped inverse to 2e-10
    (relative).  The whole EK-FAC fit of resnet18 over 32 random 32 × 32 images: 13.0–15.5 s against 67.6–68.5 s,
    its solves equal to 8e-5 (damping 0.01) and 8e-4 (1e-4) relative, as far apart as two fits by the same route in
    batches of 8 and 16 (float32 rounding)."""
    from scipy.linalg.lapack import dpstrf

    d = M.shape[0]
    matrix = M.detach().double().cpu().numpy()
    chol, piv, rank, info = dpstrf(matrix, lower=1, tol=-1.0)
    if info < 0:
        raise ValueError(f"pstrf: argument {-info} is invalid")
    factor = np.zeros((d, rank))
    factor[piv - 1] = np.tril(chol)[:, :rank]  # M = factor factorᵀ (rows back in M's order)
    U, sigma, _ = torch.linalg.svd(torch.from_numpy(factor), full_matrices=False)
    Q = torch.linalg.qr(U, mode="complete").Q if rank < d else U
    Q[:, :rank] = U
    values = torch.zeros(d, dtype=torch.float64)
    values[:rank] = sigma**2
    order = torch.argsort(values, stable=True)
    return values[order].to(M.device, M.dtype), Q[:, order].contiguous().to(M.device, M.dtype)
