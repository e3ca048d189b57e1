"""trainfluence: which training images made my model predict this, and which training labels are wrong.

    engine = trainfluence.InfluenceEngine("runs/shapes/final.pt", train_dataset)   # the command line's defaults
    scores = engine.influence(test_dataset)       # [n_test, n_train]; positive = harmful, negative = helpful

The names below load on first use, so ``import trainfluence`` (and the command line's ``--help``) does not pay
for importing torch until something needs it.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

# torch's forward-mode AD (used by torch.func.jvp for Hessian-vector products and pixel influence) loads its
# decompositions through torch.jit.script, which warns on every first use; the warning is about torch, not us.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

__version__ = "0.2.0"

_EXPORTS = {
    "DataConfig": "trainfluence.settings.data",
    "ImageDataset": "trainfluence.data",
    "load_dataset": "trainfluence.data",
    "UserError": "trainfluence.errors",
    "InfluenceEngine": "trainfluence.influence",
    "InfluenceTopK": "trainfluence.influence",
    "Objective": "trainfluence.objective",
    "InfluenceSettings": "trainfluence.settings.influence",
    "StoreSettings": "trainfluence.settings.influence",
    "build_store": "trainfluence.store",
    "tune_allocator": "trainfluence.runtime",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trainfluence' has no attribute {name!r}")
