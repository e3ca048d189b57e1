"""The gradient store: contents, reuse, resumption after SIGKILL, corruption, staleness, shards, torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from trainfluence.checkpoint import load_checkpoint
from trainfluence.data import DataConfig, load_dataset
from trainfluence.errors import UserError
from trainfluence.gradients import GradientComputer
from trainfluence.objective import FunctionalModel, Objective
from trainfluence.settings.influence import StoreSettings
from trainfluence.store import GradientStore, build_store

ENV = {**os.environ, "TRAINFLUENCE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
ARRAYS = ("grads", "scale", "loss", "pred", "label")


@pytest.fixture(scope="module")
def model(shapes_run):
    return load_checkpoint(shapes_run["checkpoint"]).model


@pytest.fixture(scope="module")
def small(shapes_run):
    return load_dataset(DataConfig("shapes", train_size=130, test_size=10), "train")


def store_files(root: Path) -> dict[str, bytes]:
    files = {f"{a}.npy": (root / f"{a}.npy").read_bytes() for a in ARRAYS}
    for rec in sorted((root / "chunks").glob("*.json")):
        files[f"chunks/{rec.name}"] = rec.read_bytes()
    return files


def test_store_contents_match_per_example_gradients(model, small, tmp_path):
    report = build_store(model, small, settings=StoreSettings(params="all", chunk_size=50), cache_dir=tmp_path)
    store = report.store
    assert store.complete and store.n == 130 and store.num_chunks == 3 and report.built_chunks == 3
    fm = FunctionalModel(model, "all")
    x, y = small.tensors()
    want = GradientComputer(fm, Objective()).flat(x, y).numpy()
    assert store.dim == fm.dim and store.key["dtype"] == "fp32"
    # the build batches by chunk (50, 50, 30 rows), the reference all 130 at once: oneDNN's convolutions order their
    # float32 sums by batch shape, so single entries can differ by ~1e-7 of the row's size (seen: 3e-7 on an entry of
    # 5e-3, relative 6e-5) — the bound is on each row as a whole
    got = store.read()
    assert float((np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)).max()) < 1e-5
    assert np.array_equal(store.column("label"), y.numpy())
    with torch.no_grad():
        logits = model(x)
    assert np.array_equal(store.column("pred"), logits.argmax(1).numpy())
    # losses agree to the float32 logits' rounding, ~1e-7 of their size (~10): an absolute bound, as some are near 0
    np.testing.assert_allclose(store.column("loss"), torch.nn.functional.cross_entropy(logits, y, reduction="none").numpy(),
                               rtol=1e-5, atol=2e-6)
    again = build_store(model, small, settings=StoreSettings(params="all", chunk_size=50), cache_dir=tmp_path)
    assert again.store.root == store.root and again.built_chunks == 0  # reused


def test_projected_fp16_store(model, small, tmp_path):
    settings = StoreSettings(params="all", projection_dim=512, projection_seed=5, chunk_size=64)
    store = build_store(model, small, settings=settings, cache_dir=tmp_path).store
    assert store.key["dtype"] == "fp16" and store.array("grads").dtype == np.float16 and store.dim == 512
    fm = FunctionalModel(model, "all")
    x, y = small.tensors()
    projector = store.projector(fm)
    assert projector.block_dims is not None and sum(projector.block_dims) == 512  # energy allocation recorded
    want = projector.project(GradientComputer(fm, Objective()).flat(x, y)).numpy()
    got = store.read()
    rel = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    assert rel.max() < 2e-3  # fp16 with per-row scaling keeps ~3 significant digits at any gradient size
    assert np.abs(store.array("grads")).max() == pytest.approx(1.0)  # rows scaled to use fp16's range


def test_chunk_written_in_bounded_pieces_is_byte_identical(model, small, tmp_path, monkeypatch):
    """A chunk's gradients are written as they are computed, in writes of at most WRITE_BYTES (plus one batch), so
    memory holds a batch, not the chunk (a resnet18's 1,024-row chunk is 46 GB). Written in pieces — fp32 and
    fp16 — the files and records are byte for byte those of a write per chunk, each record's checksum is the
    fingerprint of its whole rows, and the checksum read back a few rows at a time matches it."""
    from trainfluence.fingerprint import fingerprint
    from trainfluence.store import format as store_format

    for settings in (StoreSettings(params="all", chunk_size=64, memory_budget_mb=8),
                     StoreSettings(params="all", projection_dim=96, chunk_size=64, memory_budget_mb=8)):
        whole = build_store(model, small, settings=settings, cache_dir=tmp_path / "whole").store
        row_bytes = whole.dim * whole.array("grads").dtype.itemsize
        writes: list[int] = []
        original = store_format.GradientStore._write_rows

        def counted(self, name, start, *blocks):
            if name == "grads":
                writes.append(sum(b.nbytes for b in blocks))
            return original(self, name, start, *blocks)

        monkeypatch.setattr(store_format, "WRITE_BYTES", 3 * row_bytes)
        monkeypatch.setattr(store_format, "READ_BYTES", 5 * row_bytes)
        monkeypatch.setattr(store_format.GradientStore, "_write_rows", counted)
        pieces = build_store(model, small, settings=settings, cache_dir=tmp_path / "pieces").store
        monkeypatch.undo()
        batch = pieces.manifest["vmap_batch"]
        assert batch < 64 and len(writes) > pieces.num_chunks and max(writes) <= (3 + batch) * row_bytes, (writes, batch)
        assert store_files(pieces.root) == store_files(whole.root)
        monkeypatch.setattr(store_format, "READ_BYTES", 5 * row_bytes)
        for c in range(pieces.num_chunks):
            a, b = pieces.chunk_rows(c)
            want = fingerprint(*(np.ascontiguousarray(pieces.array(n)[a:b]) for n in ARRAYS), length=None)
            assert pieces.checksum(c) == want == json.loads(pieces.record_path(c).read_text())["sha256"]
        monkeypatch.undo()


def test_stale_store_never_reused(model, small, tmp_path):
    base = build_store(model, small, settings=StoreSettings(params="all", projection_dim=64), cache_dir=tmp_path).store
    other_model = type(model)(5)
    other_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        other_model.classifier[1].bias.add_(0.01)
    roots = {
        build_store(other_model, small, settings=StoreSettings(params="all", projection_dim=64), cache_dir=tmp_path).store.root,
        build_store(model, load_dataset(DataConfig("shapes", train_size=130, test_size=10, label_noise=0.1), "train"),
                    settings=StoreSettings(params="all", projection_dim=64), cache_dir=tmp_path).store.root,
        build_store(model, small, settings=StoreSettings(params="all", projection_dim=64, projection_seed=1), cache_dir=tmp_path).store.root,
        build_store(model, small, settings=StoreSettings(projection_dim=64, params="last"), cache_dir=tmp_path).store.root,
        build_store(model, small, settings=StoreSettings(params="all", projection_dim=64, dtype="fp32"), cache_dir=tmp_path).store.root,
    }
    assert base.root not in roots and len(roots) == 5
    # an edited manifest fails its own checksum: noticed and rebuilt, never half-read or trusted
    before = store_files(base.root)
    manifest = base.root / "manifest.json"
    manifest.write_text(manifest.read_text().replace(base.key["checkpoint"], "0" * 16))
    report = build_store(model, small, settings=StoreSettings(params="all", projection_dim=64), cache_dir=tmp_path)
    assert report.store.root == base.root and report.built_chunks == base.num_chunks
    assert store_files(base.root) == before


def test_corrupted_and_truncated_chunks_detected_and_rebuilt(model, small, tmp_path):
    settings = StoreSettings(params="all", projection_dim=128, chunk_size=40)
    ref = build_store(model, small, settings=settings, cache_dir=tmp_path / "ref").store
    store = build_store(model, small, settings=settings, cache_dir=tmp_path / "x").store
    expected = store_files(ref.root)
    grads = store.array("grads")
    grads[45, 3] = -grads[45, 3] + 1  # silently corrupt one value in chunk 1
    grads.flush()
    assert store.missing_chunks() == [1]
    report = build_store(model, small, settings=settings, cache_dir=tmp_path / "x")
    assert report.built_chunks == 1 and report.rebuilt_chunks == 1
    assert store_files(store.root) == expected
    # a truncated array file: detected from its header/size, rebuilt entirely
    path = store.root / "grads.npy"
    path.write_bytes(path.read_bytes()[:1000])
    report = build_store(model, small, settings=settings, cache_dir=tmp_path / "x")
    assert report.built_chunks == store.num_chunks
    assert store_files(store.root) == expected


def test_incomplete_store_refused_for_reading(model, small, tmp_path):
    report = build_store(model, small, settings=StoreSettings(projection_dim=32, chunk_size=30), cache_dir=tmp_path, stop_after_chunks=2)
    assert not report.store.complete
    with pytest.raises(UserError, match="incomplete"):
        report.store.require_complete()


def test_shards_compose_to_the_whole_store(model, small, tmp_path):
    settings = StoreSettings(params="all", projection_dim=128, chunk_size=20)
    whole = build_store(model, small, settings=settings, cache_dir=tmp_path / "whole").store
    parts = [build_store(model, small, settings=settings, cache_dir=tmp_path / "parts", shard=(i, 3)) for i in (2, 0, 1)]
    assert [p.built_chunks for p in parts] == [3, 2, 2] and parts[-1].store.complete
    assert store_files(parts[-1].store.root) == store_files(whole.root)


def cache_cmd(ckpt: Path, cache: Path, *extra: str) -> list[str]:
    return ["-m", "trainfluence", "cache", "--checkpoint", str(ckpt), "--train-size", "1200", "--params", "all", "--projection-dim", "256",
            "--chunk-size", "15", "--cache-dir", str(cache), *extra]


def test_sigkill_mid_build_then_resume_is_byte_identical(shapes_run, tmp_path):
    ckpt = shapes_run["checkpoint"]
    subprocess.run([sys.executable, *cache_cmd(ckpt, tmp_path / "ref")], env=ENV, check=True, capture_output=True)
    (ref_root,) = (tmp_path / "ref").iterdir()
    proc = subprocess.Popen([sys.executable, *cache_cmd(ckpt, tmp_path / "killed")], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    records: list[Path] = []
    while time.time() < deadline and len(records) < 10:
        records = list((tmp_path / "killed").glob("*/chunks/*.json"))
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (root,) = (tmp_path / "killed").iterdir()
    done = len(list((root / "chunks").glob("*.json")))
    assert 10 <= done < 80, f"kill landed after {done} of 80 chunks"
    out = subprocess.run([sys.executable, *cache_cmd(ckpt, tmp_path / "killed")], env=ENV, check=True,
                         capture_output=True, text=True).stdout
    assert f"built {80 - done} chunk(s)" in out
    assert store_files(root) == store_files(ref_root)


def test_torchrun_two_processes_bit_for_bit(shapes_run, tmp_path):
    ckpt = shapes_run["checkpoint"]
    subprocess.run([sys.executable, *cache_cmd(ckpt, tmp_path / "single")], env=ENV, check=True, capture_output=True)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--module",
                          *cache_cmd(ckpt, tmp_path / "dist")[1:]], env=ENV, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "built 40 chunk(s)" in run.stdout  # rank 0 reports its own half
    (single,), (dist,) = (tmp_path / "single").iterdir(), (tmp_path / "dist").iterdir()
    assert GradientStore(dist).complete
    assert store_files(dist) == store_files(single)


def test_cache_cli_reports(shapes_run, tmp_path, capsys):
    from trainfluence.cli import main

    args = ["cache", "--checkpoint", str(shapes_run["checkpoint"]), "--train-size", "100", "--params", "all", "--projection-dim", "64",
            "--cache-dir", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "100 examples x 64 dims (fp16, parameters: all)" in out and "examples/s" in out
    assert main(args) == 0 and "reused" in capsys.readouterr().out
    assert main(args + ["--shard", "3/2"]) == 2
