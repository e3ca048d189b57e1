"""trainfluence: which training images made my model predict this, and which training labels are wrong.

    engine = trainfluence.InfluenceEngine(model, train_dataset, solver="lissa", damping=0.01)
    engine.build_cache()
    scores = engine.influence(test_dataset)       # [n_test, n_train]; positive = harmful, negative = helpful
"""

from .data import DataConfig, ImageDataset, load_dataset
from .errors import UserError
from .influence import InfluenceEngine, InfluenceTopK
from .objective import Objective
from .store import StoreSettings, build_store

__version__ = "0.1.0"

__all__ = ["DataConfig", "ImageDataset", "InfluenceEngine", "InfluenceTopK", "Objective", "StoreSettings", "UserError",
           "build_store", "load_dataset", "__version__"]
