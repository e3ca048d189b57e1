"""Dense linear algebra shared by the solvers and the Kronecker factors."""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch


def symmetric_eigh(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and orthonormal eigenvectors of a symmetric matrix, as ``torch.linalg.eigh``.

    torch's divide-and-conquer driver can fail to converge on large rank-deficient matrices with many (near-)
    repeated eigenvalues: seen on the input factor of resnet18's last 512-channel convolution estimated from 64
    images, a 4,608 × 4,608 matrix of rank 328 (torch 2.14 on the CPU; numpy's and scipy's drivers decompose the
    same matrix).  Then LAPACK's relatively robust representation driver (``syevr``, through scipy; numpy's
    driver for a batch [..., n, n]) on the CPU in float64 does it, and the result comes back in M's dtype and on its
    device."""
    try:
        return torch.linalg.eigh(M)
    except torch.linalg.LinAlgError:
        matrix = M.detach().double().cpu().numpy()
        values, vectors = scipy.linalg.eigh(matrix, driver="evr") if matrix.ndim == 2 else np.linalg.eigh(matrix)
        return (torch.from_numpy(np.ascontiguousarray(values)).to(M.device, M.dtype),
                torch.from_numpy(np.ascontiguousarray(vectors)).to(M.device, M.dtype))
