"""The on-disk format of the per-example gradient store: memory-mapped, checksummed chunk by chunk, sharded.

One folder per key under the cache directory (default ``cache/``)::

    <cache>/grads-<fingerprint of key>/
        manifest.json      key (checkpoint fingerprint, dataset fingerprint and split, objective, parameter
                           selection, projection dim/seed/kind, dtype, chunk size) + settings + layout + checksum
        grads.npy          [n, d] fp16 (default when projected) or fp32, rows divided by ``scale``
        scale.npy          [n] fp32 per-row scale: gᵢ = scale[i] · grads[i] (max-abs for fp16, 1 for fp32,
                           so fp16 keeps ~3 significant digits whatever the gradient's magnitude)
        loss.npy pred.npy label.npy     per-example loss, predicted class, label
        chunks/000012.json completion record of chunk 12: rows and the SHA-256 of its bytes in every array
        index-*.faiss      cached faiss indices (:mod:`trainfluence.search`), each with its checksum

    Beside the store, not in it: ``<cache>/stest-<key>/`` (:mod:`.stest`) and ``<cache>/kfac-<key>/`` (:mod:`.curvature`).

A chunk's rows are written to the files and synced, and only then its record is written (atomically), so a
record vouches for bytes that are on disk; a record whose checksum no longer matches (a truncated or edited file)
marks the chunk as missing.  The manifest carries a checksum of itself: a damaged manifest is detected, never
half-read.  Arrays are allocated in full when created, so a full disk fails then, with one line, not later
in the middle of a build.  Shards (``--shard i/n``, or one per rank under torchrun) own disjoint contiguous runs of
chunks in the same files, so the store reads as one.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np
import torch

from ..errors import UserError
from ..files import disk_full, read_json, reserve, temporary_name, write_json, DISK_FULL
from ..fingerprint import RowsFingerprint, fingerprint
from ..projection import ProjectionSpec, Projector

FORMAT = "trainfluence-gradient-store-2"
ArrayLike = Union[np.ndarray, torch.Tensor]  # rows on the CPU
_sync = getattr(os, "fdatasync", os.fsync)  # fdatasync is Linux's; macOS has only fsync
# Memory bounds of the store's own passes, whatever the chunk size: a chunk's gradients are gathered up to
# WRITE_BYTES before each positioned write (one write per chunk for small rows, as fast as before; a resnet18's
# 11M-parameter rows, 45 MB each, no longer hold a whole 1,024-row chunk — 46 GB — in memory), and reads for
# checksums and scans take READ_BYTES at a time.
WRITE_BYTES = 256 << 20
READ_BYTES = 64 << 20


def _rows_per(budget: int, arr: np.ndarray) -> int:
    """Rows of ``arr`` that fit in ``budget`` bytes (at least one)."""
    return max(1, budget // max(1, int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize))
ARRAYS = ("grads", "scale", "loss", "pred", "label")


def _scaled(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Stored rows → float32 gradients, values × scale[:, None], scaled in place in the one float32 copy."""
    block = values.astype(np.float32)
    block *= scale[:, None]
    return block


class CorruptStore(UserError):
    """The store's manifest is unreadable or fails its checksum."""


def store_key(*, model: str, dataset: str, split: str, n: int, objective: str, params: list[str],
              projection: ProjectionSpec | None, dtype: str, chunk_size: int) -> dict[str, Any]:
    """Everything the stored bytes depend on (``model`` and ``dataset`` are content fingerprints)."""
    return {"format": FORMAT, "checkpoint": model, "dataset": dataset, "split": split, "n": n, "objective": objective,
            "params": list(params), "projection": projection.as_dict() if projection else None, "dtype": dtype,
            "chunk_size": chunk_size}


def store_root(cache_dir: str | Path, key: dict[str, Any]) -> Path:
    return Path(cache_dir) / f"grads-{fingerprint(key)}"


def _manifest_checksum(manifest: dict[str, Any]) -> str:
    return fingerprint({k: v for k, v in manifest.items() if k != "checksum"}, length=None)


class GradientStore:
    """Read and write access to one store folder (see the module docstring for the layout)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        try:
            manifest = read_json(self.root / "manifest.json")
            ok = isinstance(manifest, dict) and manifest.get("checksum") == _manifest_checksum(manifest)
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise CorruptStore(f"gradient store {self.root} has a damaged manifest.json: delete the folder (or run "
                               "`trainfluence cache` again, which rebuilds it)")
        self.manifest: dict[str, Any] = manifest
        self.n: int = manifest["n"]
        self.dim: int = manifest["dim"]
        self.chunk_size: int = manifest["key"]["chunk_size"]
        self.dtype = store_arrays(0, 0, manifest["key"]["dtype"])["grads"][1]  # the one layout decision
        self._arrays: dict[str, np.memmap] = {}

    # ---- layout -------------------------------------------------------------------------------------------
    @property
    def num_chunks(self) -> int:
        return (self.n + self.chunk_size - 1) // self.chunk_size

    def chunk_rows(self, c: int) -> tuple[int, int]:
        return c * self.chunk_size, min(self.n, (c + 1) * self.chunk_size)

    def shard_chunks(self, shard: tuple[int, int] = (0, 1)) -> range:
        i, n = shard
        return range(i * self.num_chunks // n, (i + 1) * self.num_chunks // n)

    def array(self, name: str) -> np.memmap:
        if name not in self._arrays:
            self._arrays[name] = np.load(self.root / f"{name}.npy", mmap_mode="r+")
        return self._arrays[name]

    @property
    def key(self) -> dict[str, Any]:
        return self.manifest["key"]

    @property
    def projection(self) -> ProjectionSpec | None:
        p = self.key["projection"]
        return ProjectionSpec(**p) if p else None

    @property
    def param_names(self) -> list[str]:
        return self.key["params"]

    def projector(self, fm: Any, objective: Any = None) -> Any:
        """The projection the store was built with, for projecting other vectors (s_test) into its space: a
        :class:`~trainfluence.projection.Projector` or a :class:`~trainfluence.factored.FactoredProjector` (for
        ``kronecker``), built for ``fm``'s selected parameters; None for full gradients."""
        spec = self.projection
        if spec is None:
            return None
        if spec.kind == "kronecker":
            from ..factored import FactoredProjector
            from ..objective import Objective

            return FactoredProjector(fm, objective or Objective(), self.manifest["factored_layout"], spec.seed)
        return Projector(spec, fm.sizes, fm.device, self.manifest.get("block_dims"))

    # ---- completion records -------------------------------------------------------------------------------
    def record_path(self, c: int) -> Path:
        return self.root / "chunks" / f"{c:06d}.json"

    def checksum(self, c: int) -> str:
        """SHA-256 of chunk ``c``'s bytes in every array (``fingerprint`` of its rows), read READ_BYTES at a time."""
        start, stop = self.chunk_rows(c)
        h = RowsFingerprint()
        for name in ARRAYS:
            arr = self.array(name)
            h.begin(arr.dtype, (stop - start, *arr.shape[1:]))
            step = _rows_per(READ_BYTES, arr)
            for a in range(start, stop, step):
                h.rows(self._read_rows(name, a, min(stop, a + step)))
            h.end()
        return h.hexdigest()

    def chunk_done(self, c: int, *, verify: bool = False) -> bool:
        path = self.record_path(c)
        if not path.is_file():
            return False
        try:
            record = read_json(path)
        except (OSError, ValueError):
            return False
        if not isinstance(record, dict) or record.get("rows") != list(self.chunk_rows(c)):
            return False
        return not verify or record.get("sha256") == self.checksum(c)

    def missing_chunks(self, shard: tuple[int, int] = (0, 1), *, verify: bool = True) -> list[int]:
        return [c for c in self.shard_chunks(shard) if not self.chunk_done(c, verify=verify)]

    @property
    def complete(self) -> bool:
        return all(self.chunk_done(c) for c in range(self.num_chunks))

    def chunk_writer(self, c: int) -> "ChunkWriter":
        """A writer for chunk ``c`` whose rows come a batch at a time (:class:`ChunkWriter`)."""
        return ChunkWriter(self, c)

    def write_chunk(self, c: int, grads: ArrayLike, loss: ArrayLike, pred: ArrayLike, label: ArrayLike) -> None:
        """Store one chunk's rows given at once (float32 gradients, a torch tensor or numpy array) and its record."""
        writer = self.chunk_writer(c)
        writer.add(grads)
        writer.finish(loss, pred, label)

    def _write_rows(self, name: str, start: int, *blocks: np.ndarray) -> None:
        """``blocks`` of rows, consecutive from row ``start`` of array ``name``, by positioned writes of its .npy
        file, then one sync to disk."""
        arr, at = self._row_offset(name, start)
        rows = sum(len(b) for b in blocks)
        if any(b.shape[1:] != arr.shape[1:] for b in blocks) or start + rows > len(arr):
            raise ValueError(f"{name}: {rows} rows at {start} do not fit {arr.shape}")
        fd = os.open(self.root / f"{name}.npy", os.O_WRONLY)
        try:
            for block in blocks:
                view = memoryview(np.ascontiguousarray(block)).cast("B")
                while view:  # pwrite may write less than asked
                    written = os.pwrite(fd, view, at)
                    view, at = view[written:], at + written
            _sync(fd)
        finally:
            os.close(fd)

    # ---- reading ------------------------------------------------------------------------------------------
    def require_complete(self) -> None:
        missing = [c for c in range(self.num_chunks) if not self.chunk_done(c)]
        if missing:
            raise UserError(f"gradient store {self.root} is incomplete ({len(missing)} of {self.num_chunks} chunks missing): "
                            "run `trainfluence cache` again to finish it")

    def read(self, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Gradients as float32 [m, d] (scale applied) for the given rows (all by default).  A contiguous range is
        read from the file (not through the memory map, whose touched pages would stay in this process's
        resident set: a pass over a large store would look like holding all of it)."""
        sel = slice(None) if rows is None else rows
        if not isinstance(sel, slice):
            sel = np.asarray(sel)
            if sel.ndim == 1 and len(sel) and (np.diff(sel) == 1).all():
                sel = slice(int(sel[0]), int(sel[-1]) + 1)
        if isinstance(sel, slice) and sel.step in (None, 1):
            start, stop, _ = sel.indices(self.n)
            return _scaled(self._read_rows("grads", start, stop), self._read_rows("scale", start, stop))
        return _scaled(self.array("grads")[sel], self.array("scale")[sel])

    def _row_offset(self, name: str, start: int) -> tuple[np.memmap, int]:
        """Array ``name`` and the byte offset of its row ``start`` in its .npy file."""
        arr = self.array(name)
        return arr, arr.offset + start * int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize

    def _read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of array ``name`` by a positioned read of its .npy file."""
        arr, at = self._row_offset(name, start)
        count = max(0, stop - start) * int(np.prod(arr.shape[1:], dtype=np.int64))
        with open(self.root / f"{name}.npy", "rb") as f:
            f.seek(at)
            out = np.fromfile(f, dtype=arr.dtype, count=count)
        if out.size != count:
            raise CorruptStore(f"gradient store {self.root}: {name}.npy is shorter than its header says: delete the "
                               "folder (or run `trainfluence cache` again, which rebuilds it)")
        return out.reshape((stop - start, *arr.shape[1:]))

    def iter_blocks(self, rows_per_block: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, float32 block)`` over all rows, RAM bounded by the block size."""
        for start, values, scale in self.iter_stored(rows_per_block):
            block = _scaled(values, scale)
            del values  # the stored copy is not held while the caller works on the block
            yield start, block

    def iter_stored(self, rows_per_block: int | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yield ``(start, values, scale)`` over all rows as stored: the gradients are ``values × scale[:, None]``
        (fp16 values hold each row divided by its largest magnitude).  For scans that apply the scale to their
        results instead of to every value; a block holds as many rows as READ_BYTES of float32 (or
        ``rows_per_block``)."""
        step = rows_per_block or max(1, min(self.n, READ_BYTES // (4 * self.dim)))
        for start in range(0, self.n, step):
            stop = min(self.n, start + step)
            yield start, self._read_rows("grads", start, stop), self._read_rows("scale", start, stop)

    def column(self, name: str) -> np.ndarray:
        return np.asarray(self.array(name))

    def content_id(self) -> str:
        """A fingerprint of every chunk's checksum: changes whenever any stored byte changes."""
        return fingerprint([read_json(self.record_path(c))["sha256"] for c in range(self.num_chunks)], length=12)

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())


class ChunkWriter:
    """One chunk's rows, written as they come: :meth:`add` each batch of float32 gradients in row order, then
    :meth:`finish` with the chunk's losses, predictions and labels.

    Rows are scaled with torch (both cores; numpy's single-threaded divide and cast took 14 ms per 1,024 × 4,096
    chunk against 3 ms) and gathered up to :data:`WRITE_BYTES`, then written with positioned writes and
    ``fdatasync``-ed (a memory map's page faults and ``msync`` cost 8–18 ms per chunk).  The checksum is of the
    bytes as written, hashed as they go — the same bytes :meth:`GradientStore.checksum` reads back on resumption —
    and the record is written only by :meth:`finish`, after every array is on disk: a chunk interrupted half-way
    has no record and is built again."""

    def __init__(self, store: GradientStore, c: int):
        self.store, self.c = store, c
        self.start, self.stop = store.chunk_rows(c)
        self.at = self.start  # the next row to write
        self._pending: list[np.ndarray] = []
        self._pending_bytes = 0
        self._scales: list[np.ndarray] = []
        self._hash = RowsFingerprint()
        self._hash.begin(np.dtype(store.dtype), (self.stop - self.start, store.dim))

    @property
    def queued(self) -> int:
        """The row after the last one added (written or pending)."""
        return self.at + sum(len(b) for b in self._pending)

    def add(self, grads: ArrayLike) -> None:
        g = torch.as_tensor(grads, dtype=torch.float32)
        if g.ndim != 2 or g.shape[1] != self.store.dim or self.queued + len(g) > self.stop:
            raise ValueError(f"chunk {self.c} expects {(self.stop - self.start, self.store.dim)} gradients; "
                             f"{tuple(g.shape)} more do not fit after {self.queued - self.start} rows")
        if self.store.dtype == np.float16:
            scale = g.abs().amax(dim=1)
            scale[scale == 0] = 1.0
            stored = (g / scale[:, None]).half().numpy()
        else:
            scale = torch.ones(len(g))
            stored = g.numpy()
        self._scales.append(scale.numpy())
        self._pending.append(stored)
        self._pending_bytes += stored.nbytes
        if self._pending_bytes >= WRITE_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        self.store._write_rows("grads", self.at, *self._pending)
        for block in self._pending:
            self._hash.rows(np.ascontiguousarray(block))
            self.at += len(block)
        self._pending, self._pending_bytes = [], 0

    def finish(self, loss: ArrayLike, pred: ArrayLike, label: ArrayLike) -> None:
        self._flush()
        if self.at != self.stop:
            raise ValueError(f"chunk {self.c} expects {self.stop - self.start} gradient rows, got {self.at - self.start}")
        self._hash.end()
        given = {"scale": np.concatenate(self._scales), "loss": loss, "pred": pred, "label": label}
        for name in ARRAYS[1:]:
            rows = np.ascontiguousarray(given[name], dtype=self.store.array(name).dtype)
            self.store._write_rows(name, self.start, rows)
            self._hash.array(rows)
        write_json(self.store.record_path(self.c), {"chunk": self.c, "rows": [self.start, self.stop],
                                                    "sha256": self._hash.hexdigest()})


def _create_exclusive(path: Path, writer) -> bool:
    """Create ``path`` atomically via a temporary file and a hard link; False if it already existed."""
    tmp = temporary_name(path)
    try:
        writer(tmp)
        os.link(tmp, path)
        return True
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            return False
        if exc.errno in DISK_FULL:
            raise disk_full(exc, path) from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)


def wipe(root: Path) -> None:
    """Remove a store's contents (keeping its folder and lock files)."""
    for entry in root.iterdir():
        if entry.name.startswith(".lock"):
            continue
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def store_arrays(n: int, dim: int, dtype: str) -> dict[str, tuple[tuple[int, ...], type]]:
    """The store's arrays: name → (shape, numpy dtype); the one place their layout is decided."""
    return {"grads": ((n, dim), np.float16 if dtype == "fp16" else np.float32), "scale": ((n,), np.float32),
            "loss": ((n,), np.float32), "pred": ((n,), np.int64), "label": ((n,), np.int64)}


def _nbytes(arrays: dict[str, tuple[tuple[int, ...], type]]) -> int:
    return sum(int(np.prod(shape)) * np.dtype(dt).itemsize for shape, dt in arrays.values())


def check_space(root: Path, n: int, dim: int, dtype: str) -> None:
    """Refuse, before anything is written, a store larger than the free space where it would go — with its size
    and the ways to shrink it (full gradients of a large model: 45 MB per resnet18 image, 2.2 TB for 50,000)."""
    needed = _nbytes(store_arrays(n, dim, dtype))
    where = next(p for p in (root, *root.parents) if p.exists())
    free = shutil.disk_usage(where).free
    if needed > free:
        projected = _nbytes(store_arrays(n, 4096, "fp16"))
        raise UserError(f"the gradient store needs {needed / 2**30:,.1f} GiB ({n:,} examples × {dim:,} values, {dtype}) "
                        f"and {where} has {free / 2**30:,.1f} GiB free: project the gradients (--projection-dim 4096: "
                        f"{projected / 2**30:,.2f} GiB), select fewer parameters (--params), or point --cache-dir at a "
                        "larger disk")


def open_store(cache_dir: str | Path, key: dict[str, Any], settings: dict[str, Any], dim: int, vmap_batch: int,
               block_dims: list[int] | None = None, factored_layout: dict[str, list[int]] | None = None) -> GradientStore:
    """Open the store for ``key``, creating its manifest and arrays if needed (safe under concurrent shards).
    Arrays are allocated in full on creation; if the disk is full, what this call created is removed."""
    root = store_root(cache_dir, key)
    n = key["n"]
    if not (root / "grads.npy").exists():
        check_space(root, n, dim, key["dtype"])
    (root / "chunks").mkdir(parents=True, exist_ok=True)
    manifest = {"key": key, "settings": settings, "n": n, "dim": dim, "vmap_batch": vmap_batch,
                "block_dims": block_dims, "factored_layout": factored_layout,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    manifest["checksum"] = _manifest_checksum(manifest)
    _create_exclusive(root / "manifest.json", lambda tmp: write_json(tmp, manifest))
    store = GradientStore(root)
    if store.key != key or store.dim != dim:
        raise UserError(f"gradient store {root} holds a different key than this run asks for: delete the folder to rebuild it")
    shapes = store_arrays(n, dim, key["dtype"])
    created: list[Path] = []
    try:
        for name, (shape, dt) in shapes.items():
            path = root / f"{name}.npy"
            if path.exists():
                try:
                    arr = np.load(path, mmap_mode="r")
                    ok = arr.shape == shape and arr.dtype == dt
                except (ValueError, OSError):
                    ok = False
                if ok:
                    continue
                path.unlink()  # truncated or damaged header: rebuild the array and every chunk
                for record in (root / "chunks").glob("*.json"):
                    record.unlink()

            def make(tmp: Path, s=shape, d=dt) -> None:
                arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=d, shape=s)
                arr.flush()
                reserve(tmp, tmp.stat().st_size)

            if _create_exclusive(path, make):
                created.append(path)
    except UserError:
        for path in created:
            path.unlink(missing_ok=True)
        raise
    return store
