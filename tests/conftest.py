"""Shared fixtures: a small trained shapes model (trained once per test session) and data locations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from trainfluence.runtime import tune_allocator

os.environ.setdefault("TRAINFLUENCE_PROGRESS", "0")  # progress bars are for people; keep test logs readable
tune_allocator()  # the API under test runs as the command line does (tests/test_runtime.py checks it in fresh processes)
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n W`: share the cores between the workers, never oversubscribe
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

ROOT = Path(__file__).resolve().parents[1]
MNIST_ROOT = (ROOT / ".." / "shared" / "data").resolve()
SHAPES_TRAIN = 4000  # big enough for ≥ 90% test accuracy after 5 epochs, small enough to train in ~20 s


def mnist_available() -> bool:
    return (MNIST_ROOT / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()


needs_mnist = pytest.mark.skipif(not mnist_available(), reason=f"MNIST files not found under {MNIST_ROOT}")


@pytest.fixture(scope="session")
def shapes_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Train the default CNN on shapes once; returns the output folder, metrics and datasets."""
    from trainfluence.data import DataConfig, load_dataset
    from trainfluence.train import TrainConfig, train

    torch.manual_seed(0)
    cfg = DataConfig("shapes", train_size=SHAPES_TRAIN, test_size=600)
    train_set, test_set = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    out = tmp_path_factory.mktemp("shapes_run")
    result = train(TrainConfig(epochs=5), train_set, test_set, out, progress=False)
    return {"out": out, "result": result, "train": train_set, "test": test_set, "checkpoint": out / "final.pt"}
