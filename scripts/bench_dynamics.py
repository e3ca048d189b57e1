"""What recording the training dynamics costs: `train` with and without the per-epoch logits record, alternated.

    python scripts/bench_dynamics.py --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import DEFAULT_MNIST, update_section  # noqa: E402

import trainfluence.train as train_module  # noqa: E402
from trainfluence.data import DataConfig, load_dataset  # noqa: E402
from trainfluence.train import TrainConfig, train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=str(DEFAULT_MNIST))
    ap.add_argument("--train-size", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    data = load_dataset(DataConfig("mnist", data_root=args.data_root, train_size=args.train_size, test_size=1000), "train")
    limit = train_module.MAX_ENTRIES
    times: dict[str, list[float]] = {"with the record": [], "without": []}
    for r in range(args.repeats):
        pair = (("with the record", limit), ("without", 0))
        for label, entries in (pair if r % 2 == 0 else pair[::-1]):  # ABBA: the order of a pair cancels out
            train_module.MAX_ENTRIES = entries
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                train(TrainConfig(epochs=args.epochs), data, None, tmp, progress=False)
                times[label].append(time.perf_counter() - t0)
    train_module.MAX_ENTRIES = limit
    w, wo = np.median(times["with the record"]), np.median(times["without"])
    body = (f"Training the default CNN on MNIST's first {args.train_size:,} images for {args.epochs} epochs, with and "
            f"without the training-dynamics record (alternated ABBA, median of {args.repeats}, 2 threads): "
            f"**{w:.1f} s vs {wo:.1f} s — ratio {w / wo:.3f}**. The record is "
            f"{args.train_size * 10 * 2 / 1e6:.1f} MB per epoch (float16 logits).")
    print(body)
    update_section("dynamics", body)


if __name__ == "__main__":
    main()
