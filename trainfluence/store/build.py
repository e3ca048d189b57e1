"""Building the gradient store: one pass of per-example gradients (projected when asked) written chunk by chunk.

A build resumes from the chunks whose records verify, rebuilds any chunk whose bytes no longer match its
record, and ends byte-identical to an uninterrupted build.  A lock per shard lets a second build of the same
store wait for the first and then reuse its work instead of doing it again.  Gradients and losses are checked
for NaN/Inf before they are written.
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..checks import FIX_MODEL, require_finite
from ..checkpoint import model_fingerprint
from ..data.source import ExampleSource, as_source
from ..errors import UserError
from ..gradients import GradientComputer
from ..objective import FunctionalModel, Objective
from ..progress import bar, note
from ..projection import ProjectionSpec, allocate
from ..settings import to_dict, validate
from ..settings.influence import StoreSettings
from .format import CorruptStore, GradientStore, open_store, store_key, store_root, wipe

PILOT_EXAMPLES = 256
# examples per batched forward/backward of the factored (kronecker) path: 64 ran 1.14× (default CNN) and 1.2×
# (resnet18, 32×32) faster than 128 on 2 CPU cores — at 128 glibc hands the activations' memory back to the OS and
# faults it in again every batch (with MALLOC_TRIM_THRESHOLD_ and MALLOC_MMAP_THRESHOLD_ raised, 128 ran as fast)
FACTORED_BATCH = 64


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → (i, n) with 0 ≤ i < n."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise UserError(f"--shard {text}: need 0 <= i < n")
    return i, n


def projection_spec(settings: StoreSettings) -> ProjectionSpec | None:
    if settings.projection_dim is None:
        return None
    return ProjectionSpec(settings.projection_dim, settings.projection_seed, settings.projection,
                          settings.projection_allocation)


def key_for(model: nn.Module, source: ExampleSource, objective: Objective, names: list[str], settings: StoreSettings,
            split: str, model_id: str | None = None) -> dict[str, Any]:
    """The store key of ``model``'s gradients on ``source`` (``model_id``: its fingerprint, when known)."""
    return store_key(model=model_id or model_fingerprint(model), dataset=source.fingerprint(), split=split,
                     n=len(source), objective=objective.name, params=names, projection=projection_spec(settings),
                     dtype=settings.resolved_dtype, chunk_size=settings.chunk_size)


def block_energies(fm: FunctionalModel, computer: GradientComputer, source: ExampleSource) -> dict[str, float]:
    """E‖g_b‖² per parameter block, from the gradients of the first ``PILOT_EXAMPLES`` training examples."""
    x, y = source.tensors(slice(0, min(len(source), PILOT_EXAMPLES)))
    energy = torch.zeros(len(fm.names), dtype=torch.float64)
    with torch.no_grad():
        for eg in computer.batches(x, y):
            energy += torch.stack([eg.grads[n].double().flatten(1).pow(2).sum() for n in fm.names]).cpu()
    require_finite(energy, "the gradients of the first training examples", FIX_MODEL)
    return dict(zip(fm.names, (energy / len(y)).tolist()))


def projection_layout(spec: ProjectionSpec, fm: FunctionalModel, computer: GradientComputer,
                      source: ExampleSource) -> list[int] | None:
    """Per-block output dimensions of the projection (None for the ``uniform`` global sketch); ``energy``
    allocation: k_b ∝ E‖g_b‖² (:func:`block_energies`)."""
    if spec.allocation == "uniform":
        return None
    energies = block_energies(fm, computer, source)
    return allocate(spec.dim, fm.sizes, [energies[n] for n in fm.names])


@contextlib.contextmanager
def build_lock(root: Path, shard: tuple[int, int]) -> Iterator[None]:
    """Exclusive lock on building shard ``i/n`` of the store at ``root``; a second builder waits, then reuses."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".lock-{shard[0]}-of-{shard[1]}", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            note(f"another process is building {root.name} (shard {shard[0]}/{shard[1]}); waiting to reuse its work")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class BuildReport:
    store: GradientStore
    built_chunks: int
    rebuilt_chunks: int  # chunks whose record existed but whose checksum failed
    seconds: float
    examples: int

    @property
    def reused(self) -> bool:
        """True when nothing had to be computed (every chunk present and verified)."""
        return self.built_chunks == 0

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
    model_id: str | None = None,
    fm: FunctionalModel | None = None,
) -> BuildReport:
    """Build (or finish, or reuse) the gradient store of ``model`` on ``data``; returns where it is and what it did.

    ``fm``: an existing functional copy of ``model`` with the settings' parameters (saves making another);
    ``stop_after_chunks`` stops after that many newly built chunks (for tests of resumption)."""
    settings = validate(settings or StoreSettings())
    objective = objective or Objective()
    source = as_source(data)
    fm = fm or FunctionalModel(model, settings.params, device=device)
    key = key_for(model, source, objective, fm.names, settings, split, model_id)
    root = store_root(cache_dir, key)
    with build_lock(root, shard):
        try:
            store = _open(model, source, fm, objective, settings, key, cache_dir)
        except CorruptStore as exc:
            note(f"{exc}; rebuilding it")
            wipe(root)
            store = _open(model, source, fm, objective, settings, key, cache_dir)
        computer = GradientComputer(fm, objective, settings.memory_budget, batch_size=store.manifest["vmap_batch"])
        projector = store.projector(fm, objective)
        factored = store.projection is not None and store.projection.kind == "kronecker"
        todo = [c for c in store.shard_chunks(shard) if not store.chunk_done(c, verify=True)]
        rebuilt = sum(1 for c in todo if store.record_path(c).is_file())
        started = time.perf_counter()
        done_examples = 0
        pbar = bar(total=sum(store.chunk_rows(c)[1] - store.chunk_rows(c)[0] for c in todo), desc="per-example gradients",
                   unit="ex", disable=not todo)
        for count, c in enumerate(todo):
            if stop_after_chunks is not None and count >= stop_after_chunks:
                break
            start, stop = store.chunk_rows(c)
            x, y = source.tensors(slice(start, stop))
            writer, losses, preds = store.chunk_writer(c), [], []
            for grads, loss, pred in _batch_gradients(x, y, fm, computer, projector, factored, store.manifest["vmap_batch"]):
                at = writer.queued  # the batch's first row
                where = f"the per-example gradients of {split} examples {at}..{at + len(loss) - 1}"
                require_finite(loss, where.replace("gradients", "losses"), FIX_MODEL)
                require_finite(grads, where, FIX_MODEL)
                writer.add(grads)  # written as it comes: memory holds a batch, not the chunk
                losses.append(loss)
                preds.append(pred)
                pbar.update(len(loss))
            writer.finish(torch.cat(losses), torch.cat(preds), y.cpu())
            done_examples += stop - start
        pbar.close()
    return BuildReport(store, len(todo), rebuilt, time.perf_counter() - started, done_examples)


def _batch_gradients(x: torch.Tensor, y: torch.Tensor, fm: FunctionalModel, computer: GradientComputer, projector: Any,
                     factored: bool, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Stored rows of one chunk on the CPU, a batch at a time: (projected) per-example gradients (float32),
    losses, predicted classes."""
    if factored:  # one batched forward/backward per batch, gradients never formed
        for i in range(0, len(y), max(1, batch)):
            flat, loss, logits = projector.per_example(x[i : i + batch], y[i : i + batch])
            yield flat.cpu(), loss.cpu(), logits.argmax(1).cpu()
        return
    batches = computer.batches(x, y)
    while True:
        with torch.no_grad():  # entered per batch: grad mode is not left off in the caller between batches
            eg = next(batches, None)
            if eg is None:
                return
            blocks = [eg.grads[name] for name in fm.names]
            flat = (projector.project_blocks(blocks) if projector else fm.flatten(eg.grads)).float().cpu()
        yield flat, eg.loss.cpu(), eg.pred.cpu()


def _open(model: nn.Module, source: ExampleSource, fm: FunctionalModel, objective: Objective, settings: StoreSettings,
          key: dict[str, Any], cache_dir: str | Path) -> GradientStore:
    """Open the store, deciding its layout (projection blocks, vmap batch) only when it is new."""
    manifest_path = store_root(cache_dir, key) / "manifest.json"
    if manifest_path.is_file():  # resume with the layout and batching the store was started with
        existing = GradientStore(manifest_path.parent)
        m = existing.manifest
        return open_store(cache_dir, key, m["settings"], existing.dim, m["vmap_batch"], m.get("block_dims"),
                          m.get("factored_layout"))
    computer = GradientComputer(fm, objective, settings.memory_budget)
    spec = projection_spec(settings)
    if spec is not None and spec.kind == "kronecker":
        from ..factored import factored_layout, layout_dim

        layout = factored_layout(fm, spec.dim, block_energies(fm, computer, source))
        return open_store(cache_dir, key, to_dict(settings), layout_dim(layout), FACTORED_BATCH, None, layout)
    block_dims = projection_layout(spec, fm, computer, source) if spec else None
    dim = (sum(block_dims) if block_dims else spec.dim) if spec else fm.dim
    x0, _ = source.tensors([0])
    return open_store(cache_dir, key, to_dict(settings), dim, computer.batch_size(x0[0].to(fm.device)), block_dims)


__all__ = ["BuildReport", "build_store", "build_lock", "key_for", "parse_shard", "projection_layout", "projection_spec"]
