"""What fixing glibc's allocator thresholds (trainfluence/runtime.py) buys: the same runs with the thresholds
fixed and with glibc's own (TRAINFLUENCE_MALLOC=default), alternated ABBA, each a fresh process timed from start
to exit, on MNIST.

``--part cli`` (section "allocator"): ``trainfluence`` commands, which fix the thresholds at start —
- train: the default CNN, 1 epoch over ``--train-size`` images;
- cache: the default gradient store (CountSketch to k = 4096, fp16) of those images;
- explain: the influence of 20 test images over the first ``--explain-size`` training images at the defaults
  (solver auto → EK-FAC, damping auto, full gradients), store built from scratch.

``--part api`` (section "allocator_api"): a Python program as a notebook would write it — all ``--train-size``
images as one tensor first, then the API (which calls ``trainfluence.tune_allocator()`` in the fixed variant) —
- the factored gradient store (``projection="kronecker"``, k = 4096) of all of them;
- the influence of 20 test images over the first ``--explain-size`` of them at the defaults (EK-FAC).

    python scripts/bench_allocator.py --part cli --data-root ../shared/data
    python scripts/bench_allocator.py --part api --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import DEFAULT_MNIST, table, update_section  # noqa: E402

VARIANTS = {"thresholds fixed (default)": {}, "glibc's own (TRAINFLUENCE_MALLOC=default)": {"TRAINFLUENCE_MALLOC": "default"}}


# the API programs: {data_root}, {n}, {m}, {ckpt}, {folder}, {what} filled in; tune_allocator() first, as README
# advises (under TRAINFLUENCE_MALLOC=default, the other variant, it leaves glibc alone)
API_PROGRAM = """
import trainfluence
from trainfluence.data import DataConfig, load_dataset
trainfluence.tune_allocator()
config = DataConfig("mnist", data_root={data_root!r}, train_size={n}, test_size=1000)
x, y = load_dataset(config, "train").tensors()       # every training image in one tensor
if {what!r} == "store":
    from trainfluence.checkpoint import load_checkpoint
    model = load_checkpoint({ckpt!r}).model
    trainfluence.build_store(model, (x, y), settings=trainfluence.StoreSettings(projection_dim=4096,
                             projection="kronecker"), cache_dir={folder!r})
else:
    engine = trainfluence.InfluenceEngine({ckpt!r}, (x[:{m}], y[:{m}]), cache_dir={folder!r})
    engine.influence(load_dataset(config, "test").tensors(list(range(20))))
"""


def run(args: list[str], extra_env: dict[str, str], threads: int) -> float:
    """Seconds of one fresh process: ``trainfluence ARGS``, or ``python -c PROGRAM`` when args is ["-c", PROGRAM]."""
    env = {**os.environ, "TRAINFLUENCE_PROGRESS": "0", "OMP_NUM_THREADS": str(threads), **extra_env}
    command = [sys.executable, *args] if args[0] == "-c" else [sys.executable, "-m", "trainfluence", *args]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"trainfluence {' '.join(args)} failed:\n{done.stderr}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["cli", "api"], default="cli")
    ap.add_argument("--data-root", default=str(DEFAULT_MNIST))
    ap.add_argument("--train-size", type=int, default=60000)
    ap.add_argument("--explain-size", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=2, help="ABBA rounds (each variant runs twice per round)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_alloc_"))
    data = ["--dataset", "mnist", "--data-root", args.data_root, "--test-size", "1000"]
    ckpt = work / "model" / "final.pt"
    print("training the model every run explains …", flush=True)
    run(["train", *data, "--train-size", str(args.train_size), "--epochs", "1", "--out", str(work / "model")], {},
        args.threads)
    workloads = {
        f"train, 1 epoch, {args.train_size:,} images": lambda d: [
            "train", *data, "--train-size", str(args.train_size), "--epochs", "1", "--out", str(d)],
        f"cache, {args.train_size:,} images, k = 4096": lambda d: [
            "cache", "--checkpoint", str(ckpt), *data, "--train-size", str(args.train_size),
            "--projection-dim", "4096", "--cache-dir", str(d)],
        f"explain 20 test images over {args.explain_size:,} training images (defaults: EK-FAC)": lambda d: [
            "explain", "--checkpoint", str(ckpt), *data, "--train-size", str(args.explain_size),
            "--index", *map(str, range(20)), "--cache-dir", str(d / "cache"), "--out", str(d / "out")],
    }
    if args.part == "api":
        fill = dict(data_root=args.data_root, n=args.train_size, m=args.explain_size, ckpt=str(ckpt))
        workloads = {
            f"all {args.train_size:,} images as one tensor, then build_store (kronecker, k = 4096)": lambda d: [
                "-c", API_PROGRAM.format(**fill, folder=str(d), what="store")],
            f"the same tensor, then InfluenceEngine over the first {args.explain_size:,} (defaults: EK-FAC), "
            "20 test images": lambda d: ["-c", API_PROGRAM.format(**fill, folder=str(d), what="influence")],
        }
    names = list(VARIANTS)
    seconds: dict[tuple[str, str], list[float]] = {(w, v): [] for w in workloads for v in names}
    for w, make in workloads.items():
        for r in range(args.rounds):
            for v in (names if r % 2 == 0 else names[::-1]) + (names[::-1] if r % 2 == 0 else names):
                folder = work / "run"
                seconds[(w, v)].append(run(make(folder), VARIANTS[v], args.threads))
                shutil.rmtree(folder, ignore_errors=True)
                print(f"{w} | {v}: {seconds[(w, v)][-1]:.1f} s", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    for w in workloads:
        fixed, own = (seconds[(w, v)] for v in names)
        rows.append([w, f"{np.median(fixed):.1f}", f"{np.median(own):.1f}",
                     f"{np.median(own) / np.median(fixed):.2f}×",
                     ", ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(fixed, own))])
    if args.part == "cli":
        title = "the same commands with glibc's thresholds fixed and with its own"
        what = "a fresh `trainfluence` process (python -m trainfluence)"
    else:
        title = "Python API programs, all images loaded as one tensor first, with the thresholds fixed and without"
        what = "a fresh `python -c` process (the program is in scripts/bench_allocator.py)"
    body = f"""### Allocator thresholds: {title}

Each run {what}, {args.threads} threads, timed start to exit; the two variants alternated ABBA, {args.rounds}
rounds ({2 * args.rounds} runs each); medians. The fixed thresholds (mmap 32 MiB, trim 64 MiB;
trainfluence/runtime.py) are what the command line sets at start and `trainfluence.tune_allocator()` sets for an
API program.

{table(["run", "fixed s", "glibc's own s", "speed-up", "runs (fixed/own, in order)"], rows)}
"""
    print(body)
    if not args.no_write:
        update_section("allocator" if args.part == "cli" else "allocator_api", body)


if __name__ == "__main__":
    main()
