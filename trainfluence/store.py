"""The per-example gradient store: computed once, memory-mapped, resumable, sharded, never stale.

One folder per key under the cache directory (default ``cache/``)::

    <cache>/grads-<hash of key>/
        manifest.json      key (checkpoint content hash, dataset fingerprint and split, objective, parameter
                           selection, projection dim/seed/kind, dtype, chunk size) + settings + layout
        grads.npy          [n, d] fp16 (default when projected) or fp32, rows divided by ``scale``
        scale.npy          [n] fp32 per-row scale: gᵢ = scale[i] · grads[i] (max-abs for fp16, 1 for fp32,
                           so fp16 keeps ~3 significant digits whatever the gradient's magnitude)
        loss.npy pred.npy label.npy     per-example loss, predicted class, label
        chunks/000012.json completion record of chunk 12: rows and the SHA-256 of its bytes in every array

Writing is chunk by chunk: a chunk's rows are computed, written into the memmaps, flushed, and only then its
record is written (atomically).  A build killed at any moment restarts from the chunks that have records and
ends byte-identical to an uninterrupted one; a record whose checksum no longer matches the data (truncated or
corrupted file) is detected and the chunk rebuilt.  Shards (``--shard i/n``, or one per rank under torchrun)
build disjoint contiguous runs of chunks into the same files, so the store reads as one.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from .checkpoint import state_hash
from .data.source import ExampleSource, as_source
from .errors import UserError
from .gradients import DEFAULT_MEMORY_BUDGET, GradientComputer
from .objective import FunctionalModel, Objective
from .progress import bar
from .projection import ProjectionSpec, Projector, allocate
from .settings import read_json, sha256_bytes, stable_hash, to_dict, write_json

FORMAT = "trainfluence-gradient-store-1"
ARRAYS = ("grads", "scale", "loss", "pred", "label")


@dataclass
class StoreSettings:
    """What to store.  Saved in the manifest; every field but ``memory_budget`` is part of the key."""

    params: str = "all"  # all | last | comma-separated module/parameter names
    project_dim: int | None = None  # k; None stores full gradients
    project_seed: int = 0
    projection: str = "countsketch"  # countsketch (O(p)) | gaussian (dense, for comparison)
    projection_allocation: str = "energy"  # energy (k_b ∝ E‖g_b‖², small blocks exact) | uniform
    dtype: str | None = None  # fp16 | fp32; default fp16 when projected, fp32 otherwise
    chunk_size: int = 1024  # rows per completion record
    memory_budget: int = DEFAULT_MEMORY_BUDGET  # bytes for one vmap batch

    @property
    def resolved_dtype(self) -> str:
        return self.dtype or ("fp16" if self.project_dim else "fp32")

    @property
    def projection_spec(self) -> ProjectionSpec | None:
        if not self.project_dim:
            return None
        return ProjectionSpec(self.project_dim, self.project_seed, self.projection, self.projection_allocation)

    def validate(self) -> None:
        if self.resolved_dtype not in ("fp16", "fp32"):
            raise UserError(f"unknown --dtype {self.dtype!r}: use fp16 or fp32")
        if self.chunk_size < 1:
            raise UserError(f"--chunk-size must be positive, got {self.chunk_size}")
        if self.projection_spec is not None:
            self.projection_spec.validate()


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → (i, n) with 0 ≤ i < n."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise UserError(f"--shard {text}: need 0 <= i < n")
    return i, n


def _create_exclusive(path: Path, writer) -> bool:
    """Create ``path`` atomically via a temporary file and a hard link; False if it already existed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    writer(tmp)
    try:
        os.link(tmp, path)
        return True
    except OSError as exc:
        if exc.errno != errno.EEXIST:
            raise
        return False
    finally:
        tmp.unlink(missing_ok=True)


class GradientStore:
    """Read and write access to one store folder (see the module docstring for the layout)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.manifest: dict[str, Any] = read_json(self.root / "manifest.json")
        self.n: int = self.manifest["n"]
        self.dim: int = self.manifest["dim"]
        self.chunk_size: int = self.manifest["key"]["chunk_size"]
        self.dtype = np.float16 if self.manifest["key"]["dtype"] == "fp16" else np.float32
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

    def projector(self, sizes: list[int], device: torch.device | str = "cpu") -> Projector | None:
        """The projection the store was built with (None for full gradients), for projecting other vectors."""
        spec = self.projection
        return Projector(spec, sizes, device, self.manifest.get("block_dims")) if spec else None

    # ---- completion records -------------------------------------------------------------------------------
    def _record_path(self, c: int) -> Path:
        return self.root / "chunks" / f"{c:06d}.json"

    def _checksum(self, c: int) -> str:
        start, stop = self.chunk_rows(c)
        return sha256_bytes(*(memoryview(np.ascontiguousarray(self.array(a)[start:stop])).cast("B") for a in ARRAYS))

    def chunk_done(self, c: int, *, verify: bool = False) -> bool:
        path = self._record_path(c)
        if not path.is_file():
            return False
        try:
            record = read_json(path)
        except ValueError:
            return False
        if record.get("rows") != list(self.chunk_rows(c)):
            return False
        return not verify or record.get("sha256") == self._checksum(c)

    def missing_chunks(self, shard: tuple[int, int] = (0, 1), *, verify: bool = True) -> list[int]:
        return [c for c in self.shard_chunks(shard) if not self.chunk_done(c, verify=verify)]

    @property
    def complete(self) -> bool:
        return all(self.chunk_done(c) for c in range(self.num_chunks))

    def write_chunk(self, c: int, grads: np.ndarray, loss: np.ndarray, pred: np.ndarray, label: np.ndarray) -> None:
        """Store one chunk's rows (float32 gradients, scaled here), flush, then write its record."""
        start, stop = self.chunk_rows(c)
        if grads.shape != (stop - start, self.dim):
            raise ValueError(f"chunk {c} expects {(stop - start, self.dim)} gradients, got {grads.shape}")
        if self.dtype == np.float16:
            scale = np.abs(grads).max(axis=1).astype(np.float32)
            scale[scale == 0] = 1.0
        else:
            scale = np.ones(len(grads), dtype=np.float32)
        values = {"grads": (grads / scale[:, None]).astype(self.dtype), "scale": scale, "loss": loss.astype(np.float32),
                  "pred": pred.astype(np.int64), "label": label.astype(np.int64)}
        for name, value in values.items():
            arr = self.array(name)
            arr[start:stop] = value
            arr.flush()
        write_json(self._record_path(c), {"chunk": c, "rows": [start, stop], "sha256": self._checksum(c)})

    # ---- reading ------------------------------------------------------------------------------------------
    def require_complete(self) -> None:
        missing = [c for c in range(self.num_chunks) if not self.chunk_done(c)]
        if missing:
            raise UserError(f"gradient store {self.root} is incomplete ({len(missing)} of {self.num_chunks} chunks missing): "
                            "run `trainfluence cache` again to finish it")

    def read(self, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Gradients as float32 [m, d] (scale applied) for the given rows (all by default)."""
        sel = slice(None) if rows is None else rows
        return self.array("grads")[sel].astype(np.float32) * self.array("scale")[sel][:, None]

    def iter_blocks(self, rows_per_block: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, float32 block)`` over all rows, RAM bounded by the block size."""
        step = rows_per_block or max(1, min(self.n, (64 << 20) // (4 * self.dim)))
        for start in range(0, self.n, step):
            yield start, self.read(slice(start, min(self.n, start + step)))

    def column(self, name: str) -> np.ndarray:
        return np.asarray(self.array(name))

    def content_id(self) -> str:
        """A hash of every chunk's checksum: changes whenever any stored byte changes."""
        return stable_hash([read_json(self._record_path(c))["sha256"] for c in range(self.num_chunks)], 12)

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())


def store_key(model: nn.Module, source: ExampleSource, objective: Objective, fm: FunctionalModel,
              settings: StoreSettings, split: str) -> dict[str, Any]:
    spec = settings.projection_spec
    return {
        "format": FORMAT,
        "checkpoint": state_hash(model),
        "dataset": source.fingerprint(),
        "split": split,
        "n": len(source),
        "objective": objective.name,
        "params": fm.names,
        "projection": to_dict(spec) if spec else None,
        "dtype": settings.resolved_dtype,
        "chunk_size": settings.chunk_size,
    }


def store_root(cache_dir: str | Path, key: dict[str, Any]) -> Path:
    return Path(cache_dir) / f"grads-{stable_hash(key)}"


def open_store(cache_dir: str | Path, key: dict[str, Any], settings: StoreSettings, dim: int, vmap_batch: int,
               block_dims: list[int] | None = None) -> GradientStore:
    """Open the store for ``key``, creating its manifest and files if needed (safe under concurrent shards)."""
    root = store_root(cache_dir, key)
    (root / "chunks").mkdir(parents=True, exist_ok=True)
    n = key["n"]
    manifest = {"key": key, "settings": to_dict(settings), "n": n, "dim": dim, "vmap_batch": vmap_batch,
                "block_dims": block_dims, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _create_exclusive(root / "manifest.json", lambda tmp: write_json(tmp, manifest))
    existing = read_json(root / "manifest.json")
    if existing.get("key") != to_dict(key) or existing.get("dim") != dim:
        raise UserError(f"gradient store {root} holds a different key than this run asks for: delete the folder to rebuild it")
    dtype = np.float16 if key["dtype"] == "fp16" else np.float32
    shapes = {"grads": ((n, dim), dtype), "scale": ((n,), np.float32), "loss": ((n,), np.float32),
              "pred": ((n,), np.int64), "label": ((n,), np.int64)}
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
        _create_exclusive(path, lambda tmp, s=shape, d=dt: np.lib.format.open_memmap(tmp, mode="w+", dtype=d, shape=s).flush())
    return GradientStore(root)


PILOT_EXAMPLES = 256


def projection_layout(spec: ProjectionSpec, fm: FunctionalModel, computer: GradientComputer,
                      source: ExampleSource) -> list[int] | None:
    """Per-block output dimensions of the projection (None for the ``uniform`` global sketch).

    ``energy``: block energies E‖g_b‖² from the gradients of the first ``PILOT_EXAMPLES`` training examples."""
    if spec.allocation == "uniform":
        return None
    x, y = source.tensors(slice(0, min(len(source), PILOT_EXAMPLES)))
    energy = torch.zeros(len(fm.names), dtype=torch.float64)
    with torch.no_grad():
        for eg in computer.batches(x, y):
            energy += torch.stack([eg.grads[n].double().flatten(1).pow(2).sum() for n in fm.names]).cpu()
    return allocate(spec.dim, fm.sizes, (energy / len(y)).tolist())


@dataclass
class BuildReport:
    store: GradientStore
    built_chunks: int
    rebuilt_chunks: int  # chunks whose record existed but whose checksum failed
    seconds: float
    examples: int

    @property
    def throughput(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else float("nan")


def build_store(
    model: nn.Module,
    data: Any,
    *,
    objective: Objective | None = None,
    settings: StoreSettings | None = None,
    cache_dir: str | Path = "cache",
    split: str = "train",
    shard: tuple[int, int] = (0, 1),
    device: torch.device | str = "cpu",
    stop_after_chunks: int | None = None,
) -> BuildReport:
    """Build (or finish, or reuse) the gradient store of ``model`` on ``data``; returns where it is and what it did.

    ``stop_after_chunks`` stops after that many newly built chunks (for tests of resumption).
    """
    settings = settings or StoreSettings()
    settings.validate()
    objective = objective or Objective()
    source = as_source(data)
    fm = FunctionalModel(model, settings.params, device=device)
    computer = GradientComputer(fm, objective, settings.memory_budget)
    x0, _ = source.tensors([0])
    spec = settings.projection_spec
    key = store_key(model, source, objective, fm, settings, split)
    manifest_path = store_root(cache_dir, key) / "manifest.json"
    if manifest_path.is_file():  # resume with the layout and batching the store was started with
        existing = read_json(manifest_path)
        block_dims, dim, vmap_batch = existing.get("block_dims"), existing["dim"], existing["vmap_batch"]
    else:
        block_dims = projection_layout(spec, fm, computer, source) if spec else None
        dim = (sum(block_dims) if block_dims else spec.dim) if spec else fm.dim
        vmap_batch = computer.batch_size(x0[0].to(fm.device))
    store = open_store(cache_dir, key, settings, dim, vmap_batch, block_dims)
    computer._batch = store.manifest["vmap_batch"]
    projector = store.projector(fm.sizes, fm.device)

    todo = [c for c in store.shard_chunks(shard) if not store.chunk_done(c, verify=True)]
    rebuilt = sum(1 for c in todo if store._record_path(c).is_file())
    started = time.perf_counter()
    done_examples = 0
    pbar = bar(total=sum(store.chunk_rows(c)[1] - store.chunk_rows(c)[0] for c in todo), desc="per-example gradients",
               unit="ex", disable=not todo)
    for count, c in enumerate(todo):
        if stop_after_chunks is not None and count >= stop_after_chunks:
            break
        start, stop = store.chunk_rows(c)
        x, y = source.tensors(slice(start, stop))
        parts, losses, preds = [], [], []
        with torch.no_grad():
            for eg in computer.batches(x, y):
                blocks = [eg.grads[name] for name in fm.names]
                flat = projector.project_blocks(blocks) if projector else fm.flatten(eg.grads)
                parts.append(flat.float().cpu())
                losses.append(eg.loss.cpu())
                preds.append(eg.pred.cpu())
        store.write_chunk(c, torch.cat(parts).numpy(), torch.cat(losses).numpy(), torch.cat(preds).numpy(), y.cpu().numpy())
        done_examples += stop - start
        pbar.update(stop - start)
    pbar.close()
    return BuildReport(store, len(todo), rebuilt, time.perf_counter() - started, done_examples)
