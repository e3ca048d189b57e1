"""Self-influence ∇ℓ(z)ᵀP⁻¹∇ℓ(z) under EK-FAC (the default solver for networks), two ways in one engine and one
process: ``factored`` (the engine's path: one forward and one backward pass per batch, each layer's quadratic
form from its rotated inputs and output gradients, no gradient formed; ``KroneckerCurvature.example_quadratic_forms``)
against ``stored`` (the per-example gradients read from the built store and whitened, the path before commit
5735f09).  Times alternate factored, stored, factored, stored after the EK-FAC fit and the store build, so
neither is counted; the agreement is between the two results.

Models, each trained here by ``trainfluence train``: the default CNN on 5,000 MNIST images (3 epochs; every
image scored) and torchvision's resnet18 on 300 shapes images (2 epochs; ``--resnet-rows`` images scored, as a
stored row costs about 2 s).

    python scripts/bench_self_influence.py          # about 15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import DEFAULT_MNIST, table, update_section  # noqa: E402

from trainfluence.checkpoint import load_checkpoint  # noqa: E402
from trainfluence.data import load_dataset  # noqa: E402
from trainfluence.influence import InfluenceEngine  # noqa: E402


def train(out: Path, argv: list[str]) -> Path:
    subprocess.run([sys.executable, "-m", "trainfluence", "train", *argv, "--out", str(out), "--device", "cpu"],
                   check=True, stdout=subprocess.DEVNULL, env={**os.environ, "TRAINFLUENCE_PROGRESS": "0"})
    return out / "final.pt"


def measure(name: str, checkpoint: Path, rows: int | None, cache: Path) -> list[object]:
    ck = load_checkpoint(checkpoint)
    cfg = ck.meta.data_config
    train_set = load_dataset(cfg, "train")
    engine = InfluenceEngine(checkpoint, train_set, cache_dir=cache, device="cpu")
    idx = np.arange(len(train_set) if rows is None else min(rows, len(train_set)))
    start = time.perf_counter()
    curvature = engine.solver.factored(engine.operator)
    fit = time.perf_counter() - start
    start = time.perf_counter()
    engine.build_cache()
    build = time.perf_counter() - start
    seconds: dict[str, list[float]] = {"factored": [], "stored": []}
    result: dict[str, np.ndarray] = {}
    for _ in range(2):
        for mode in seconds:
            if mode == "stored":
                engine.solver.factored = lambda op: None  # the store's rows, whitened
            else:
                engine.solver.__dict__.pop("factored", None)
            start = time.perf_counter()
            result[mode] = engine.self_influence(idx)
            seconds[mode].append(time.perf_counter() - start)
    a, b = result["factored"], result["stored"]
    per = {m: [1000 * s / len(idx) for s in v] for m, v in seconds.items()}
    print(name, per, flush=True)
    return [name, f"{engine.fm.dim:,}", engine.solver.name, len(idx), curvature.batch_size, f"{fit:.0f}", f"{build:.0f}",
            " / ".join(f"{v:.2f}" for v in per["factored"]), " / ".join(f"{v:.2f}" for v in per["stored"]),
            f"{np.mean(per['stored']) / np.mean(per['factored']):.2f}×",
            f"{float(np.max(np.abs(a - b) / np.abs(b))):.1e}", f"{spearmanr(a, b).statistic:.6f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=str(DEFAULT_MNIST))
    ap.add_argument("--resnet-rows", type=int, default=24)
    ap.add_argument("--no-write", action="store_true", help="print only; do not update BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if (Path(args.data_root) / "MNIST").exists():
            cnn = train(tmp / "cnn", ["--dataset", "mnist", "--data-root", args.data_root, "--train-size", "5000",
                                      "--test-size", "100", "--epochs", "3"])
            rows.append(measure("default CNN, 5,000 MNIST", cnn, None, tmp / "cache-cnn"))
        else:
            print(f"no MNIST under {args.data_root}: the CNN row is skipped", file=sys.stderr)
        resnet = train(tmp / "resnet", ["--arch", "resnet18", "--train-size", "300", "--test-size", "60", "--epochs", "2"])
        rows.append(measure("resnet18, 300 shapes", resnet, args.resnet_rows, tmp / "cache-resnet"))
    body = f"""### Self-influence under EK-FAC: factored (no gradient formed) against stored rows whitened

One engine per model at its defaults, in one process; ms per image for each of two alternating runs; the EK-FAC fit
(its batch: examples the `--memory-budget` of 1 GiB holds, at most 128) and the store build are timed apart and
counted in neither. Agreement: the largest relative difference between the two results, and their Spearman
correlation (float32 models: the two sum the same terms in different orders).

{table(["model", "parameters", "solver", "images scored", "fit batch", "fit s", "store build s",
        "factored ms/image", "stored ms/image", "stored / factored", "max relative difference", "Spearman"], rows)}
"""
    print(body)
    if not args.no_write:
        update_section("self_influence", body)


if __name__ == "__main__":
    main()
