"""faiss top-k over a gradient store: the training rows with the largest and the smallest inner product with
query vectors — the primitive behind helpful/harmful ranking (influence = −⟨s_test, gᵢ⟩, so the largest inner
products are the most helpful training examples and the smallest the most harmful).

The index file lives beside the store (its name carries the store's content id, so a rebuilt chunk makes a new
one) with a SHA-256 beside it: an edited or truncated index is noticed and rebuilt, never silently used.  Queries
must be finite, and faiss's "no result" (index −1) never reaches a caller.

``auto`` (default) is ``flat`` while its float32 copy of the store fits ``FLAT_MAX_BYTES`` (2 GiB: 131k rows at
k = 4,096), else ``stream``.  ``stream`` keeps nothing in memory: each search reads the store's rows
block by block (positioned reads, 64 MB of float32) and keeps a running top-k — exact, memory bounded by one block
whatever n is, and slower (0.46 s per query at 60k rows: BENCHMARKS.md "bench:memory").  ``flat`` is exact (``IndexFlatIP``, float32; up to ``FEW_QUERIES`` queries are answered by one matrix
product over its rows instead, one pass over memory for both lists); ``fp16`` is exhaustive over fp16 copies of the rows
(``IndexScalarQuantizer``, half the memory and about twice as fast for a single query; exact up to fp16
rounding, which is what an fp16 store holds anyway); ``ivf`` clusters the rows into ``nlist`` cells and
searches ``nprobe`` of them (``IndexIVFFlat``) — approximate, for large n (its recall on gradients is reported
in BENCHMARKS.md).  Both lists of a query come from one faiss call over ``[q; −q]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

from .checks import require_finite
from .errors import UserError
from .files import discard, save_verified, verified
from .progress import bar, note
from .settings import validate
from .settings.influence import FLAT_MAX_BYTES, SearchSettings
from .store import GradientStore

#: up to this many queries, ``flat`` answers from one matrix product (one pass over the rows for both lists);
#: more, and faiss's blocked product over [q; −q] is faster per query
FEW_QUERIES = 4


@dataclass
class TopK:
    """Per query: indices and inner products of the k largest and the k smallest."""

    largest_index: np.ndarray  # [m, k]
    largest_score: np.ndarray  # [m, k] ⟨q, gᵢ⟩, descending
    smallest_index: np.ndarray  # [m, k]
    smallest_score: np.ndarray  # [m, k] ⟨q, gᵢ⟩, ascending


class GradientIndex:
    """A faiss index over every row of a complete store (gradients with their per-row scale applied)."""

    def __init__(self, store: GradientStore, settings: SearchSettings | None = None):
        store.require_complete()
        self.store, self.settings = store, validate(settings or SearchSettings())
        self.kind = self.settings.kind
        self.rows_per_block: int | None = None  # stream: rows read per block (None: 64 MB of float32)
        if self.kind == "auto":
            self.kind = "flat" if 4 * store.n * store.dim <= FLAT_MAX_BYTES else "stream"
        self.index = None if self.kind == "stream" else self._load_or_build()

    def _path(self) -> Path:
        name = f"ivf{self._nlist()}" if self.kind == "ivf" else self.kind
        return self.store.root / f"index-{name}-{self.store.content_id()}.faiss"

    def _nlist(self) -> int:
        return self.settings.nlist or max(1, min(self.store.n // 39, int(4 * np.sqrt(self.store.n))))

    def _load_or_build(self) -> faiss.Index:
        path = self._path()
        if path.is_file():  # the name carries the store's content id: a rebuilt chunk gives a new index
            if verified(path):
                index = faiss.read_index(str(path))
                if index.ntotal == self.store.n and index.d == self.store.dim:
                    return self._configure(index)
            note(f"faiss index {path.name} does not match its checksum (edited or truncated); rebuilding it")
            discard(path)
        d = self.store.dim
        if self.kind == "flat":
            index: faiss.Index = faiss.IndexFlatIP(d)
        elif self.kind == "fp16":
            index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        else:
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, self._nlist(), faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(0)
            sample = np.sort(rng.choice(self.store.n, size=min(self.store.n, 256 * self._nlist()), replace=False))
            index.train(np.ascontiguousarray(self.store.read(sample)))
        pbar = bar(total=self.store.n, desc="faiss index", unit="row")
        for _, block in self.store.iter_blocks():  # one block in memory besides the index
            index.add(np.ascontiguousarray(block))
            pbar.update(len(block))
        pbar.close()
        save_verified(path, lambda tmp: faiss.write_index(index, str(tmp)))
        return self._configure(index)

    def _configure(self, index: faiss.Index) -> faiss.Index:
        if self.kind == "ivf":
            faiss.extract_index_ivf(index).nprobe = self.settings.nprobe
        return index

    def search(self, queries: np.ndarray, k: int) -> TopK:
        """Top-k largest and smallest ⟨q, gᵢ⟩ for each row q of ``queries`` [m, d]."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.store.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the store {self.store.dim}")
        require_finite(q, "the search queries (s_test)", "the solve diverged — raise --damping or change --solver")
        if k < 1:
            raise UserError(f"top-k needs k ≥ 1, got {k}")
        k = min(k, self.store.n)
        if self.kind == "stream":
            return self._stream(q, k)
        if self.kind == "flat" and len(q) <= FEW_QUERIES:
            return self._scan(q, k)
        scores, index = self.index.search(np.concatenate([q, -q]), k)
        if (index < 0).any() or not np.isfinite(scores).all():  # faiss's "no result": fewer hits than asked
            raise UserError(f"the {self.kind} index returned fewer than {k} results per query: use --index flat, "
                            "or a larger --nprobe for ivf")
        m = len(q)
        return TopK(index[:m], scores[:m], index[m:], -scores[m:])

    def _stream(self, q: np.ndarray, k: int) -> TopK:
        """Exact top-k reading the store block by block: a running candidate set of k largest and k smallest per
        query, merged with each block's scores (memory: one block and [m, block + k] scores)."""
        m = len(q)
        big_i = np.empty((m, 0), dtype=np.int64)
        big_s = np.empty((m, 0), dtype=np.float32)
        small_i, small_s = big_i, big_s
        q_t = torch.from_numpy(q)
        for start, values, scale in self.store.iter_stored(self.rows_per_block):
            # ⟨q, values·s⟩ = ⟨q, values⟩·s: the scale goes on the scores, and torch converts fp16 on every core
            # (1.8× faster than numpy's single-threaded astype for 60k × 4,096)
            scores = (q_t @ torch.from_numpy(values).float().T).numpy() * scale
            if not np.isfinite(scores).all():
                raise UserError("the gradient store holds non-finite rows: delete the cache folder and build it again")
            idx = np.broadcast_to(np.arange(start, start + len(values)), scores.shape)
            big_i, big_s = _keep(np.concatenate([big_i, idx], 1), np.concatenate([big_s, scores], 1), k, largest=True)
            small_i, small_s = _keep(np.concatenate([small_i, idx], 1), np.concatenate([small_s, scores], 1), k,
                                     largest=False)
        return TopK(big_i, big_s, small_i, small_s)

    def _scan(self, q: np.ndarray, k: int) -> TopK:
        """Exact top-k for a few queries from one matrix product over the flat index's own float32 rows (no copy):
        one pass over memory gives both lists, where faiss's per-query scan reads the rows once per list."""
        rows = faiss.rev_swig_ptr(faiss.downcast_index(self.index).get_xb(), self.store.n * self.store.dim)
        scores = q @ np.asarray(rows).reshape(self.store.n, self.store.dim).T  # [m, n]
        if not np.isfinite(scores).all():
            raise UserError("the flat index holds non-finite rows: delete the cache folder and build it again")
        idx = np.broadcast_to(np.arange(self.store.n), scores.shape)
        return TopK(*_keep(idx, scores, k, largest=True), *_keep(idx, scores, k, largest=False))


def _keep(index: np.ndarray, scores: np.ndarray, k: int, *, largest: bool) -> tuple[np.ndarray, np.ndarray]:
    """The k best columns per row of (index, scores), sorted (ties: lower training index first)."""
    key = -scores if largest else scores
    if key.shape[1] > k:
        part = np.argpartition(key, k - 1, axis=1)[:, :k]
        index, scores, key = (np.take_along_axis(a, part, 1) for a in (index, scores, key))
    order = np.lexsort((index, key), axis=1)
    return np.take_along_axis(index, order, 1), np.take_along_axis(scores, order, 1)


def brute_force_top_k(matrix: np.ndarray, queries: np.ndarray, k: int) -> TopK:
    """numpy reference: the same result as :meth:`GradientIndex.search` by a full matrix product."""
    scores = np.atleast_2d(queries) @ matrix.T
    order = np.argsort(-scores, axis=1, kind="stable")
    big = order[:, :k]
    small = np.argsort(scores, axis=1, kind="stable")[:, :k]
    return TopK(big, np.take_along_axis(scores, big, 1), small, np.take_along_axis(scores, small, 1))


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact top-k indices found by the approximate search."""
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact)]))
