"""The s_test cache, beside the gradient stores: s_test = H⁻¹∇ℓ(z_test) is solved once per test set and setting.

    <cache>/stest-<fingerprint of key>/
        key.json                     what the vectors depend on (model, training data, parameters, objective,
                                     solver and its settings, damping, Hessian sampling) — for people to read
        <test fingerprint>.npy       [m, p] float32, with <…>.npy.sha256 beside it
        <test fingerprint>.json      the solve's report (converged, steps, residual …)

The key does not involve a built store: s_test needs the Hessian's data, not the stored gradients.  A file whose
checksum fails, or whose shape or values are wrong, is a miss (with a note), never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..checks import all_finite
from ..files import discard, npy_writer, read_json, save_verified, verified, write_json
from ..fingerprint import fingerprint
from ..progress import note


class STestCache:
    def __init__(self, cache_dir: str | Path, key: dict[str, Any]):
        self.key = key
        self.root = Path(cache_dir) / f"stest-{fingerprint(key)}"

    def _paths(self, test_id: str) -> tuple[Path, Path]:
        return self.root / f"{test_id}.npy", self.root / f"{test_id}.json"

    def load(self, test_id: str, shape: tuple[int, int]) -> tuple[np.ndarray, dict[str, Any]] | None:
        """The cached vectors and their solve report, or None (missing, damaged or not finite)."""
        vectors, report = self._paths(test_id)
        if not vectors.exists():
            return None
        try:
            if not verified(vectors):
                raise ValueError("checksum mismatch")
            array = np.load(vectors)
            info = read_json(report)
            if array.shape != shape or not all_finite(array):
                raise ValueError(f"shape {array.shape} or values wrong")
        except (OSError, ValueError) as exc:
            note(f"cached s_test {vectors} is damaged ({exc}); solving again")
            discard(vectors)
            return None
        return array, info

    def save(self, test_id: str, array: np.ndarray, report: dict[str, Any]) -> None:
        vectors, info = self._paths(test_id)
        write_json(self.root / "key.json", self.key)
        save_verified(vectors, npy_writer(np.asarray(array, dtype=np.float32)))
        write_json(info, report)
