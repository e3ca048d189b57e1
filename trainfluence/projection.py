"""Seeded random projections P: ℝᵖ → ℝᵏ that preserve inner products in expectation, E⟨Pa, Pb⟩ = ⟨a, b⟩.

``countsketch`` (default; O(p) per vector): every coordinate j of the flat parameter vector is sent to one
bucket h(j) ∈ {0…k−1} with a sign s(j) ∈ {±1}, (Pa)_b = Σ_{j: h(j)=b} s(j) a_j.  Hashes and signs are drawn per
parameter block from (seed, block index), so a block's gradients are projected as they come, without building
the concatenated p-vector.  Its error is exactly

    Var⟨Pa, Pb⟩ = (‖a‖²‖b‖² + ⟨a, b⟩² − 2 Σⱼ aⱼ² bⱼ²) / k  ≤  2 ‖a‖² ‖b‖² / k,

so |⟨Pa, Pb⟩ − ⟨a, b⟩| ≤ √(2/(k δ)) ‖a‖ ‖b‖ with probability ≥ 1 − δ (Chebyshev): the Johnson–Lindenstrauss
scale ‖a‖‖b‖/√k.

``gaussian`` (for comparison; O(p·k) per vector): dense i.i.d. N(0, 1/k) entries, Var⟨Pa, Pb⟩ =
(‖a‖²‖b‖² + ⟨a, b⟩²)/k.

The same projector applies to any vector — gradients when the store is built, s_test when it is queried.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError

KINDS = ("countsketch", "gaussian")
_DENSE_CACHE_LIMIT = 1 << 30  # bytes of dense Gaussian blocks kept in memory


@dataclass(frozen=True)
class ProjectionSpec:
    dim: int
    seed: int = 0
    kind: str = "countsketch"

    def validate(self) -> None:
        if self.dim < 1:
            raise UserError(f"--project-dim must be positive, got {self.dim}")
        if self.kind not in KINDS:
            raise UserError(f"unknown projection {self.kind!r}: use {' or '.join(KINDS)}")


def _block_generator(seed: int, block: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + block * 7919 + 12345) % (2**63 - 1))
    return g


class Projector:
    """Projects per-block or flat vectors ``[..., p] → [..., k]``; ``sizes`` are the parameter blocks' numels."""

    def __init__(self, spec: ProjectionSpec, sizes: list[int], device: torch.device | str = "cpu"):
        spec.validate()
        self.spec, self.sizes, self.device = spec, list(sizes), torch.device(device)
        self.dim_in = sum(sizes)
        self._buckets: list[torch.Tensor] = []
        self._signs: list[torch.Tensor] = []
        self._dense: dict[int, torch.Tensor] = {}
        if spec.kind == "countsketch":
            for b, m in enumerate(sizes):
                g = _block_generator(spec.seed, b, self.device)
                self._buckets.append(torch.randint(0, spec.dim, (m,), generator=g).to(self.device))
                self._signs.append((torch.randint(0, 2, (m,), generator=g) * 2 - 1).float().to(self.device))

    @property
    def dim(self) -> int:
        return self.spec.dim

    def _dense_block(self, b: int) -> torch.Tensor:
        if b in self._dense:
            return self._dense[b]
        g = _block_generator(self.spec.seed, b, self.device)
        block = (torch.randn(self.sizes[b], self.spec.dim, generator=g) / self.spec.dim**0.5).to(self.device)
        if sum(t.numel() for t in self._dense.values()) * 4 + block.numel() * 4 <= _DENSE_CACHE_LIMIT:
            self._dense[b] = block
        return block

    def project_blocks(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """``blocks[b]`` is [B, m_b] (or [B, *shape_b]); returns [B, k] in float32."""
        batch = blocks[0].shape[0]
        out = torch.zeros(batch, self.spec.dim, dtype=torch.float32, device=blocks[0].device)
        for b, block in enumerate(blocks):
            block = block.reshape(batch, -1).float()
            if self.spec.kind == "countsketch":
                out.index_add_(1, self._buckets[b], block * self._signs[b])
            else:
                out += block @ self._dense_block(b)
        return out

    def project(self, flat: torch.Tensor) -> torch.Tensor:
        """Flat vectors [..., p] → [..., k]."""
        if flat.shape[-1] != self.dim_in:
            raise ValueError(f"expected vectors of length {self.dim_in}, got {flat.shape[-1]}")
        lead = flat.shape[:-1]
        rows = flat.reshape(-1, self.dim_in).to(self.device)
        out = self.project_blocks(list(torch.split(rows, self.sizes, dim=1)))
        return out.reshape(*lead, self.spec.dim)
