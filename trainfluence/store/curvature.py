"""The Kronecker-factored curvature cache, beside the gradient stores and the s_test cache: an EK-FAC or K-FAC fit
(one or two passes over the Hessian's examples, minutes on a large model) is kept once per model, training data
and setting, so ``explain`` and ``audit`` on the same run, or a second query, fit it once.

    <cache>/kfac-<fingerprint of key>/
        key.json           what the fit depends on (model, training data, parameters, objective, the examples it is
                           estimated from, EK-FAC or K-FAC, the batch cap, :data:`FORMAT`) — for people to read
        fit.npz            :meth:`~trainfluence.kfac.KroneckerCurvature.arrays`, with fit.npz.sha256 beside it

The batch the fit took (at most the cap, fewer when ``--memory-budget`` holds fewer) changes the factors only by
rounding, so it is recorded in the file, not part of the key.  A file whose checksum fails, or whose arrays do not
fit the model's layers, is a miss (with a note), never a traceback; loading reads plain arrays (no pickle).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..files import discard, save_verified, verified, write_json
from ..fingerprint import fingerprint
from ..progress import note

if TYPE_CHECKING:
    from ..kfac import KroneckerCurvature

FORMAT = 2  # raised whenever the arrays or what they mean change (2: the fit's output directions per batch)


class CurvatureCache:
    def __init__(self, cache_dir: str | Path, key: dict[str, Any]):
        self.key = {**key, "format": FORMAT}
        self.root = Path(cache_dir) / f"kfac-{fingerprint(self.key)}"
        self.path = self.root / "fit.npz"

    def load(self, kc: "KroneckerCurvature") -> bool:
        """Fill ``kc`` from the cached fit; False (nothing changed) when there is none or it is damaged."""
        if not self.path.exists():
            return False
        try:
            if not verified(self.path):
                raise ValueError("checksum mismatch")
            with np.load(self.path, allow_pickle=False) as arrays:
                kc.restore({name: arrays[name] for name in arrays.files})
        except (OSError, ValueError, KeyError) as exc:
            note(f"cached curvature {self.path} is damaged ({exc}); fitting again")
            discard(self.path)
            return False
        return True

    def save(self, kc: "KroneckerCurvature") -> None:
        arrays = kc.arrays()

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        write_json(self.root / "key.json", self.key)
        save_verified(self.path, write)
