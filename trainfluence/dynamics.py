"""Training dynamics: every training example's logits as the optimiser saw them, one record per epoch.

``train`` keeps the logits of each minibatch forward pass (no extra computation: the model had to compute them
to take the step) in dataset order, and writes them beside each epoch checkpoint as ``epoch-E.logits.npy``
(float16 [n, K]); the checkpoint's metadata holds the file's name and SHA-256, so a record is read only with
the checkpoint of its own run and never after it was edited.  Each example's logits in epoch t come from the
model *before* that example's step of epoch t — in epoch 1, from a model that has not yet seen it.

From the records (T epochs, z_t the logits, y the given label):

* margin_t = z_t[y] − max_{c≠y} z_t[c]; **AUM** (area under the margin, Pleiss et al. 2020) = mean_t margin_t;
  the audit's ``aum`` score is −AUM (higher = more suspicious).
* loss_t = logsumexp(z_t) − z_t[y]; ``avg_loss`` = mean_t loss_t (checkpoint-averaged loss).
* **forgetting events** (Toneva et al. 2019): epochs t where the example was classified correctly at t−1 and
  wrongly at t; an example never classified correctly counts T (more than any forgotten one can have).
* ``probabilities`` = softmax(z_t) per epoch (the audit's noise estimate reads the least memorised epoch's);
  ``mean_probs`` = their mean over epochs, from which the audit suggests labels (less memorised than the final
  model's).

Records are skipped (with a note) when one epoch's logits would exceed :data:`MAX_ENTRIES` values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .files import npy_writer, save_with
from .fingerprint import file_sha256, fingerprint

MAX_ENTRIES = 50_000_000  # n·K per epoch (100 MB as float16); above this, train records no dynamics


def record_name(epoch: int) -> str:
    return f"epoch-{epoch}.logits.npy"


def save_record(folder: Path, epoch: int, logits: np.ndarray, images: str) -> dict[str, object]:
    """Write one epoch's logits; returns the metadata the epoch checkpoint keeps: file, SHA-256, shape and the
    fingerprint of the images they were computed on (``images_fingerprint``; labels may differ later — the
    signals are read against whatever labels are audited)."""
    path = folder / record_name(epoch)
    save_with(path, npy_writer(np.ascontiguousarray(logits, dtype=np.float16)))
    return {"file": path.name, "sha256": file_sha256(path), "shape": list(logits.shape), "images": images}


def images_fingerprint(images: object) -> str:
    """Identity of a training set's pixels in order (what a dynamics record is valid for)."""
    return fingerprint("dynamics-images", images)


def load_record(folder: Path, meta: dict[str, object], n: int, num_classes: int, images: str | None = None) -> np.ndarray:
    """The logits a checkpoint's metadata points to, verified (one-line error if missing, edited, mis-shaped or
    recorded on other images than ``images``, a fingerprint from :func:`images_fingerprint`)."""
    path = folder / str(meta.get("file", ""))
    if not path.is_file() or path.parent != folder:
        raise UserError(f"training dynamics {path} are missing: retrain with `trainfluence train` (it writes them)")
    if file_sha256(path) != meta.get("sha256"):
        raise UserError(f"training dynamics {path} do not match their checkpoint (edited or from another run): retrain")
    if images is not None and meta.get("images") != images:
        raise UserError(f"training dynamics {path} were recorded on other images than the ones audited: audit the "
                        "training set the checkpoint was trained on")
    arr = np.load(path, allow_pickle=False)
    if arr.shape != (n, num_classes):
        raise UserError(f"training dynamics {path} hold {arr.shape}, not ({n}, {num_classes}): they belong to other data")
    return arr.astype(np.float32)


@dataclass
class Dynamics:
    """T epochs of logits for n examples with their given labels; the signals of the module docstring."""

    logits: np.ndarray  # float32 [T, n, K]
    labels: np.ndarray  # int [n]

    def until(self, epoch: int) -> "Dynamics":
        """The records of epochs 0 … ``epoch`` (0-based) only: the signals as they stood after that epoch."""
        return Dynamics(self.logits[: epoch + 1], self.labels)

    def _given(self) -> np.ndarray:
        return np.take_along_axis(self.logits, self.labels[None, :, None], 2)[..., 0]  # [T, n]

    def margins(self) -> np.ndarray:
        other = self.logits.copy()
        np.put_along_axis(other, self.labels[None, :, None], -np.inf, 2)
        return self._given() - other.max(2)

    def losses(self) -> np.ndarray:
        z = self.logits.astype(np.float64)
        top = z.max(2, keepdims=True)
        lse = (top + np.log(np.exp(z - top).sum(2, keepdims=True)))[..., 0]
        return lse - self._given()

    def correct(self) -> np.ndarray:
        return self.logits.argmax(2) == self.labels[None, :]

    def aum(self) -> np.ndarray:
        return self.margins().mean(0)

    def avg_loss(self) -> np.ndarray:
        return self.losses().mean(0)

    def forgetting(self) -> np.ndarray:
        c = self.correct()
        events = (c[:-1] & ~c[1:]).sum(0).astype(np.float64)
        events[~c.any(0)] = c.shape[0]
        return events

    def probabilities(self) -> np.ndarray:
        """[T, n, K] softmax of each epoch's logits."""
        z = self.logits.astype(np.float64)
        p = np.exp(z - z.max(2, keepdims=True))
        return p / p.sum(2, keepdims=True)

    def mean_probs(self) -> np.ndarray:
        return self.probabilities().mean(0)


__all__ = ["Dynamics", "MAX_ENTRIES", "images_fingerprint", "load_record", "record_name", "save_record"]
