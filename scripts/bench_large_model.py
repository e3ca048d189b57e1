"""Peak memory and wall time of the commands at their defaults on a large model: torchvision's resnet18 (11.2M
parameters, full per-example gradients of 45 MB each) on the embedded shapes data, each command a fresh process.

Peak memory is each command's maximum resident set size (``getrusage(RUSAGE_CHILDREN).ru_maxrss`` in a process
whose only child is the command). A command killed by the OOM killer shows as exit code −9.  Before the store's
writes, self-influence and s_test were stepped by memory (commits 6aace25, af5a67b, 1eda34c), ``explain`` and
``audit`` here were killed at 24 GB.

    python scripts/bench_large_model.py                    # 300 training images, about 25 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import table, update_section  # noqa: E402


# a process whose only child is the command: its children's peak resident set is that command's
_MEASURE = ("import resource, subprocess, sys; "
            "code = subprocess.run([sys.executable, '-m', 'trainfluence', *sys.argv[1:]], stdout=subprocess.DEVNULL).returncode; "
            "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def run(argv: list[str]) -> tuple[int, float, float]:
    """(exit code, seconds, peak resident GiB) of ``trainfluence argv`` in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *argv], capture_output=True, text=True,
                          env={**os.environ, "TRAINFLUENCE_PROGRESS": "0"})
    seconds = time.perf_counter() - start
    code, peak_kib = (int(v) for v in proc.stdout.split()[-2:])
    if code:
        print(proc.stderr[-2000:], file=sys.stderr)
    return code, seconds, peak_kib / 2**20  # ru_maxrss: KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-size", type=int, default=300)
    ap.add_argument("--no-write", action="store_true", help="print only; do not update BENCHMARKS.md")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, cache = Path(tmp) / "run", Path(tmp) / "cache"
        steps = [
            ("train (2 epochs)", ["train", "--arch", "resnet18", "--train-size", str(args.train_size), "--test-size", "60",
                                 "--epochs", "2", "--label-noise", "0.1", "--out", str(run_dir), "--device", "cpu"]),
            ("explain, 2 test images, top 5 (builds the store, fits EK-FAC)",
             ["explain", "--checkpoint", str(run_dir / "final.pt"), "--index", "0", "1", "--top", "5",
              "--out", str(Path(tmp) / "explain"), "--cache-dir", str(cache), "--device", "cpu"]),
            ("audit, every score, top 8 suspects (store and EK-FAC fit reused)",
             ["audit", "--checkpoint", str(run_dir / "final.pt"), "--label-noise", "0.1", "--top", "8", "--detail", "2",
              "--out", str(Path(tmp) / "audit"), "--cache-dir", str(cache), "--device", "cpu"]),
        ]
        for name, argv in steps:
            print(f"{name} …", flush=True)
            code, seconds, peak = run(argv)
            print(f"  exit {code}, {seconds:.0f} s, peak {peak:.1f} GiB", flush=True)
            rows.append([name, code, f"{seconds:.0f}", f"{peak:.1f}"])
            if code:
                break
    body = f"""### Commands at their defaults on torchvision's resnet18 (11.2M parameters), {args.train_size} shapes images

Each command in a fresh process, one after another on the same run and cache; peak = the process's maximum resident
set size. Full per-example gradients (the default: no projection) are 45 MB per image (11,171,397 float32 values);
memory stays bounded because the store's writes and s_test take as many rows per step as `--memory-budget` (1 GiB)
allows, and the EK-FAC fit as many examples per batch (`KroneckerCurvature.batch_within`: 14 here, not 128).
Self-influence under EK-FAC forms no gradients: one forward and one backward pass per batch give each layer's
gᵀP⁻¹g (`KroneckerCurvature.example_quadratic_forms`). At ded2e99, before those two changes (commits 13550de,
5735f09), explain took 417 s at 10.1 GiB peak and audit 956 s at 10.2 GiB. The audit loads the EK-FAC fit explain
saved (`<cache>/kfac-<key>/`, commit bbe65f9); at 7db1d55 it fitted its own: 392 s at 4.7 GiB.

{table(["command", "exit code", "seconds", "peak resident GiB"], rows)}
"""
    print(body)
    if not args.no_write:
        update_section("large_model", body)


if __name__ == "__main__":
    main()
