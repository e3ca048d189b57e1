"""trainfluence: which training images made my model predict this, and which training labels are wrong.

    engine = trainfluence.InfluenceEngine(model, train_dataset, solver="lissa", damping=0.01)
    engine.build_cache()
    scores = engine.influence(test_dataset)       # [n_test, n_train]; positive = harmful, negative = helpful
"""

import warnings

# torch's forward-mode AD (used by torch.func.jvp for Hessian-vector products and pixel influence) loads its
# decompositions through torch.jit.script, which warns on every first use; the warning is about torch, not us.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

from .data import DataConfig, ImageDataset, load_dataset  # noqa: E402
from .errors import UserError  # noqa: E402
from .influence import InfluenceEngine, InfluenceTopK  # noqa: E402
from .objective import Objective  # noqa: E402
from .store import StoreSettings, build_store  # noqa: E402

__version__ = "0.1.0"

__all__ = ["DataConfig", "ImageDataset", "InfluenceEngine", "InfluenceTopK", "Objective", "StoreSettings", "UserError",
           "build_store", "load_dataset", "__version__"]
