"""Seeded random projections P: ℝᵖ → ℝᵏ that preserve inner products in expectation, E⟨Pa, Pb⟩ = ⟨a, b⟩.

The flat parameter vector is made of blocks (one per parameter tensor).  Each block b gets its own range of
k_b output coordinates (Σ k_b = k):

* a block with k_b = m_b (its size) is copied exactly;
* otherwise it is sketched into its k_b coordinates — ``countsketch`` (default; O(m_b) per vector): coordinate j
  goes to bucket h(j) with sign s(j) ∈ {±1}, (Pa)_h = Σ_{j: h(j)=h} s(j) aⱼ; or ``gaussian`` (dense N(0, 1/k_b)
  entries, O(m_b·k_b), for comparison).  Hashes, signs and Gaussian entries are drawn from (seed, block index).

Error.  For a CountSketch block, exactly Var = (‖a_b‖²‖b_b‖² + ⟨a_b, b_b⟩² − 2 Σⱼ a_bj² b_bj²)/k_b ≤ 2‖a_b‖²‖b_b‖²/k_b
(a Gaussian block: (‖a_b‖²‖b_b‖² + ⟨a_b, b_b⟩²)/k_b, the same bound); blocks are independent, so

    Var⟨Pa, Pb⟩ ≤ σ²(a, b) = Σ_{b sketched} 2 ‖a_b‖² ‖b_b‖² / k_b,
    |⟨Pa, Pb⟩ − ⟨a, b⟩| ≤ σ(a, b) / √δ  with probability ≥ 1 − δ   (Chebyshev),

the Johnson–Lindenstrauss scale: with one block, σ = √(2/k) ‖a‖‖b‖.

Allocation of k over blocks.  ``uniform``: one CountSketch of the whole vector into all k coordinates (every
block shares every bucket).  ``energy`` (default): minimise Σ_b w_b²/k_b, the bound above when both vectors have
block energies w_b = E‖g_b‖², subject to Σ k_b = k — the solution is k_b ∝ w_b, capped at m_b (such blocks are
copied exactly and their surplus is shared out again).  The energies come from a pilot of training gradients
when the store is built and are recorded in its manifest, so every later vector (s_test) is projected the same
way.  Gradients concentrate in few small blocks (the classifier's weights carry ~90% of the default CNN's
gradient norm), and keeping those exact makes projected influence rankings far closer to exact ones
(BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import UserError

KINDS = ("countsketch", "gaussian", "kronecker")  # kronecker: trainfluence.factored
ALLOCATIONS = ("energy", "uniform")
_DENSE_CACHE_LIMIT = 1 << 30  # bytes of dense Gaussian blocks kept in memory


@dataclass(frozen=True)
class ProjectionSpec:
    dim: int
    seed: int = 0
    kind: str = "countsketch"
    allocation: str = "energy"

    def as_dict(self) -> dict[str, object]:
        return {"dim": self.dim, "seed": self.seed, "kind": self.kind, "allocation": self.allocation}

    def validate(self) -> None:
        if self.dim < 1:
            raise UserError(f"--projection-dim must be positive, got {self.dim}")
        if self.kind not in KINDS:
            raise UserError(f"unknown projection {self.kind!r}: use {' or '.join(KINDS)}")
        if self.allocation not in ALLOCATIONS:
            raise UserError(f"unknown projection allocation {self.allocation!r}: use {' or '.join(ALLOCATIONS)}")


def allocate(k: int, sizes: list[int], energies: list[float]) -> list[int]:
    """Output coordinates per block: k_b ∝ energy, capped at the block size (water-filling), Σ k_b = min(k, p)."""
    m = np.asarray(sizes, dtype=np.int64)
    if k >= m.sum():
        return m.tolist()
    w = np.maximum(np.asarray(energies, dtype=np.float64), 1e-30 * max(1e-300, float(np.max(energies))))
    dims = np.zeros(len(m), dtype=np.int64)
    free = np.ones(len(m), dtype=bool)
    budget = k
    while True:
        share = budget * w * free / (w * free).sum()
        full = free & (share >= m)
        if not full.any():
            break
        dims[full] = m[full]
        budget -= int(m[full].sum())
        free &= ~full
    # integer shares for the sketched blocks: at least 1 each, largest remainders first, never above the size
    share = budget * w * free / (w * free).sum()
    base = np.where(free, np.clip(np.floor(share), 1, m), 0).astype(np.int64)
    left = budget - int(base[free].sum())
    order = np.argsort(-(share - np.floor(share)) * free)
    i = 0
    while left != 0 and free.any():
        b = order[i % len(order)]
        if free[b] and (left > 0 and base[b] < m[b] or left < 0 and base[b] > 1):
            base[b] += 1 if left > 0 else -1
            left += -1 if left > 0 else 1
        i += 1
    dims[free] = base[free]
    return dims.tolist()


def _block_generator(seed: int, block: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + block * 7919 + 12345) % (2**63 - 1))
    return g


class Projector:
    """Projects per-block or flat vectors ``[..., p] → [..., dim]``.

    ``sizes`` are the blocks' numels; ``block_dims`` their output coordinates (None: the ``uniform`` global
    sketch into all k coordinates).
    """

    def __init__(self, spec: ProjectionSpec, sizes: list[int], device: torch.device | str = "cpu",
                 block_dims: list[int] | None = None):
        spec.validate()
        self.spec, self.sizes, self.device = spec, list(sizes), torch.device(device)
        self.dim_in = sum(sizes)
        if block_dims is not None and (len(block_dims) != len(sizes) or any(d < 1 or d > m for d, m in zip(block_dims, sizes))):
            raise ValueError(f"block_dims {block_dims} do not fit blocks of sizes {sizes}")
        self.block_dims = list(block_dims) if block_dims is not None else None
        self.dim = sum(block_dims) if block_dims is not None else spec.dim
        offsets = np.cumsum([0] + (self.block_dims or [0] * len(sizes)))[:-1]
        self._offsets = [int(o) for o in offsets]
        self._buckets: list[torch.Tensor | None] = []
        self._signs: list[torch.Tensor | None] = []
        self._dense: dict[int, torch.Tensor] = {}
        for b, m in enumerate(sizes):
            width = self._width(b)
            if self._exact(b) or spec.kind != "countsketch":
                self._buckets.append(None)
                self._signs.append(None)
                continue
            g = _block_generator(spec.seed, b)
            self._buckets.append((torch.randint(0, width, (m,), generator=g) + self._offsets[b] * (self.block_dims is not None)).to(self.device))
            self._signs.append((torch.randint(0, 2, (m,), generator=g) * 2 - 1).float().to(self.device))

    def _width(self, b: int) -> int:
        return self.block_dims[b] if self.block_dims is not None else self.spec.dim

    def _exact(self, b: int) -> bool:
        return self.block_dims is not None and self.block_dims[b] == self.sizes[b]

    def _dense_block(self, b: int) -> torch.Tensor:
        if b in self._dense:
            return self._dense[b]
        width = self._width(b)
        block = (torch.randn(self.sizes[b], width, generator=_block_generator(self.spec.seed, b)) / width**0.5).to(self.device)
        if sum(t.numel() for t in self._dense.values()) * 4 + block.numel() * 4 <= _DENSE_CACHE_LIMIT:
            self._dense[b] = block
        return block

    def project_blocks(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """``blocks[b]`` is [B, m_b] (or [B, *shape_b]); returns [B, dim] in float32."""
        batch = blocks[0].shape[0]
        out = torch.zeros(batch, self.dim, dtype=torch.float32, device=blocks[0].device)
        for b, block in enumerate(blocks):
            block = block.reshape(batch, -1).float()
            if self.block_dims is None:
                target = out
            else:
                target = out[:, self._offsets[b] : self._offsets[b] + self.block_dims[b]]
            if self._exact(b):
                target += block
            elif self.spec.kind == "countsketch":
                out.index_add_(1, self._buckets[b], block * self._signs[b])
            else:
                target += block @ self._dense_block(b)
        return out

    def project(self, flat: torch.Tensor) -> torch.Tensor:
        """Flat vectors [..., p] → [..., dim]."""
        if flat.shape[-1] != self.dim_in:
            raise ValueError(f"expected vectors of length {self.dim_in}, got {flat.shape[-1]}")
        lead = flat.shape[:-1]
        rows = flat.reshape(-1, self.dim_in).to(self.device)
        out = self.project_blocks(list(torch.split(rows, self.sizes, dim=1)))
        return out.reshape(*lead, self.dim)

    def variance_bound(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """σ²(a, b) = Σ_{sketched blocks} 2‖a_b‖²‖b_b‖²/k_b for flat vectors a, b (broadcast over rows);
        for the ``uniform`` global sketch, 2‖a‖²‖b‖²/k."""
        if self.block_dims is None:
            return 2 * a.double().pow(2).sum(-1) * b.double().pow(2).sum(-1) / self.spec.dim
        total = torch.zeros(torch.broadcast_shapes(a.shape[:-1], b.shape[:-1]), dtype=torch.float64)
        for i, (ab, bb) in enumerate(zip(torch.split(a, self.sizes, -1), torch.split(b, self.sizes, -1))):
            if not self._exact(i):
                total = total + 2 * ab.double().pow(2).sum(-1) * bb.double().pow(2).sum(-1) / self._width(i)
        return total
