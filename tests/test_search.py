"""faiss top-k over the store against numpy brute force; IVF recall."""

from __future__ import annotations

import numpy as np
import pytest

from trainfluence.checkpoint import load_checkpoint
from trainfluence.data import DataConfig, load_dataset
from trainfluence.search import FEW_QUERIES, GradientIndex, SearchSettings, brute_force_top_k, recall_at_k
from trainfluence.settings.influence import StoreSettings
from trainfluence.store import build_store


@pytest.fixture(scope="module")
def store(shapes_run, tmp_path_factory):
    model = load_checkpoint(shapes_run["checkpoint"]).model
    data = load_dataset(DataConfig("shapes", train_size=1500, test_size=10), "train")
    return build_store(model, data, settings=StoreSettings(params="all", projection_dim=256, dtype="fp32"),
                       cache_dir=tmp_path_factory.mktemp("search")).store


@pytest.mark.parametrize("m", [1, FEW_QUERIES + 1])  # one matrix product for a few queries; faiss for more
def test_flat_index_equals_brute_force(store, m):
    matrix = store.read()
    rng = np.random.default_rng(0)
    queries = matrix[rng.choice(store.n, m)] + 0.1 * rng.normal(size=(m, store.dim)).astype(np.float32) * matrix.std()
    got = GradientIndex(store).search(queries, 10)
    want = brute_force_top_k(matrix, queries, 10)
    np.testing.assert_allclose(got.largest_score, want.largest_score, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.smallest_score, want.smallest_score, rtol=1e-4, atol=1e-6)
    assert recall_at_k(got.largest_index, want.largest_index) == 1.0
    assert recall_at_k(got.smallest_index, want.smallest_index) == 1.0
    assert (np.diff(got.largest_score, axis=1) <= 1e-6).all() and (np.diff(got.smallest_score, axis=1) >= -1e-6).all()
    # the index file is reused on the next open
    assert len(list(store.root.glob("index-flat-*.faiss"))) == 1
    again = GradientIndex(store).search(queries, 10)
    assert np.array_equal(again.largest_index, got.largest_index)


def test_fp16_index_close_to_exact(store):
    matrix = store.read()
    queries = matrix[10:15]
    want = brute_force_top_k(matrix, queries, 10)
    got = GradientIndex(store, SearchSettings("fp16")).search(queries, 10)
    scale = np.abs(want.largest_score).max()
    np.testing.assert_allclose(got.largest_score, want.largest_score, atol=2e-3 * scale)
    np.testing.assert_allclose(got.smallest_score, want.smallest_score, atol=2e-3 * scale)
    assert recall_at_k(got.largest_index, want.largest_index) >= 0.9


def test_ivf_recall(store):
    matrix = store.read()
    queries = matrix[:20]
    exact = brute_force_top_k(matrix, queries, 10)
    full = GradientIndex(store, SearchSettings("ivf", nlist=16, nprobe=16)).search(queries, 10)
    assert recall_at_k(full.largest_index, exact.largest_index) == 1.0  # probing every cell is exact
    part = GradientIndex(store, SearchSettings("ivf", nlist=16, nprobe=4)).search(queries, 10)
    r = recall_at_k(part.largest_index, exact.largest_index)
    assert 0.3 < r <= 1.0


def test_stream_search_is_exact_in_bounded_memory(store, monkeypatch):
    """stream reads the store block by block with a running top-k: the brute-force answer, no index file, and
    what --index auto picks once the flat copy would exceed FLAT_MAX_BYTES."""
    import trainfluence.search as search

    matrix = store.read()
    rng = np.random.default_rng(1)
    queries = matrix[rng.choice(store.n, 3)] + 0.1 * rng.normal(size=(3, store.dim)).astype(np.float32) * matrix.std()
    want = brute_force_top_k(matrix, queries, 25)
    index = GradientIndex(store, SearchSettings("stream"))
    index.rows_per_block = 97  # 16 blocks, the last one short: the merge is exercised
    got = index.search(queries, 25)
    np.testing.assert_allclose(got.largest_score, want.largest_score, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.smallest_score, want.smallest_score, rtol=1e-5, atol=1e-6)
    assert recall_at_k(got.largest_index, want.largest_index) == 1.0
    assert recall_at_k(got.smallest_index, want.smallest_index) == 1.0
    assert not list(store.root.glob("index-stream-*"))
    monkeypatch.setattr(search, "FLAT_MAX_BYTES", 4 * store.n * store.dim - 1)
    assert GradientIndex(store).kind == "stream"
    monkeypatch.setattr(search, "FLAT_MAX_BYTES", 4 * store.n * store.dim)
    assert GradientIndex(store).kind == "flat"
