"""What the finiteness checks cost the gradient store build (issue: trust boundary and bad input).

Builds the store of the same MNIST images with the default CNN (all parameters, CountSketch to k = 4096, fp16)
several times, alternating builds with the checks as shipped and builds with the checks replaced by a no-op, each
into a fresh folder; reports the throughput of each and the ratio of the medians.

    python scripts/bench_checks.py --n 10000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import DEFAULT_MNIST, table, update_section  # noqa: E402

import trainfluence.store.build as build_module  # noqa: E402
from trainfluence.data import DataConfig, load_dataset  # noqa: E402
from trainfluence.models import build_model  # noqa: E402
from trainfluence.settings.influence import StoreSettings  # noqa: E402
from trainfluence.store import build_store  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=str(DEFAULT_MNIST))
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    data = load_dataset(DataConfig("mnist", data_root=args.data_root, train_size=args.n, test_size=10), "train")
    model = build_model("cnn", 10, 1, 28).eval()
    settings = StoreSettings(params="all", projection_dim=4096)
    shipped = build_module.require_finite
    rates: dict[str, list[float]] = {"checks on": [], "checks off": []}
    for _ in range(args.rounds):
        for label in rates:
            build_module.require_finite = shipped if label == "checks on" else (lambda value, *a, **k: value)
            with tempfile.TemporaryDirectory() as cache:
                report = build_store(model, data, settings=settings, cache_dir=cache)
            rates[label].append(report.throughput)
            print(f"{label}: {report.throughput:,.0f} examples/s", flush=True)
    build_module.require_finite = shipped
    on, off = statistics.median(rates["checks on"]), statistics.median(rates["checks off"])
    body = f"""### Cost of the finiteness checks in the store build

MNIST, first {args.n:,} training images, default CNN (untrained, seeded; all parameters), CountSketch to k = 4096,
fp16; {args.rounds} builds each way, alternating, each into a fresh folder.

{table(["build", "examples/s (each build)", "median"], [[k, ", ".join(f"{r:,.0f}" for r in v), statistics.median(v)] for k, v in rates.items()])}

Throughput with the checks / without: **{on / off:.3f}** (the checks are one sum per chunk of its projected
gradients and of its losses — a NaN or Inf makes the sum non-finite — with an entry-by-entry check only then).
"""
    print(body)
    update_section("checks", body)


if __name__ == "__main__":
    main()
