"""Peak memory of reading a gradient store, against n: a synthetic fp16 store (k = 4,096 columns, random rows,
written through the real store format) at 60k and at 10×60k rows; each measurement in a fresh process, peak
resident set (VmHWM).

The peak is VmHWM from /proc (getrusage's ru_maxrss would carry the parent's peak across fork and exec).
Measured per store: a top-10 helpful/harmful query at ``--index auto`` (flat below 2 GiB of float32, stream
above), at ``--index stream``, and one pass over every row (what whole-dataset self-influence and TracIn
self-scores do: ``iter_blocks``).

    python scripts/bench_memory.py            # writes ~0.5 GB and ~4.9 GB under --work, removed afterwards
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import table, update_section  # noqa: E402

from trainfluence.store.format import open_store, store_key  # noqa: E402

CHILD = r"""
import json, sys, time
import numpy as np
from trainfluence.runtime import tune_allocator
tune_allocator()  # as the command line does before it reads a store
from trainfluence.store.format import GradientStore
from trainfluence.search import GradientIndex, SearchSettings

def peak_mb():  # VmHWM: this process's peak resident set (reset by exec, unlike getrusage's ru_maxrss)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

root, what = sys.argv[1], sys.argv[2]
store = GradientStore(root)
q = np.random.default_rng(0).standard_normal((1, store.dim)).astype(np.float32)
before = peak_mb()
t0 = time.perf_counter()
if what == "pass":
    total = 0.0
    for _, block in store.iter_blocks():
        total += float(np.square(block, out=block).sum(dtype=np.float64))  # in place: only the read is measured
    seconds = time.perf_counter() - t0
    kind = "one pass"
else:
    index = GradientIndex(store, SearchSettings(what))
    index.search(q, 10)
    t1 = time.perf_counter()
    index.search(q, 10)
    seconds = time.perf_counter() - t1
    kind = index.kind
print(json.dumps({"kind": kind, "before_mb": before, "peak_mb": peak_mb(), "seconds": seconds}))
"""


def make_store(work: Path, n: int, dim: int, chunk: int) -> Path:
    key = store_key(model=f"synthetic-{n}", dataset="synthetic", split="train", n=n, objective="ce", params=["all"],
                    projection=None, dtype="fp16", chunk_size=chunk)
    store = open_store(work, key, {}, dim, 1)
    rng = np.random.default_rng(n)
    for c in range(store.num_chunks):
        start, stop = store.chunk_rows(c)
        rows = stop - start
        store.write_chunk(c, rng.standard_normal((rows, dim), dtype=np.float32), np.zeros(rows), np.zeros(rows),
                          np.zeros(rows))
    return store.root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[60_000, 600_000])
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    results = Path("runs/bench_memory.json")
    saved = json.loads(results.read_text()) if results.exists() else {}
    for n in args.n:
        work = Path(tempfile.mkdtemp(prefix="bench_memory_", dir=args.work))
        try:
            t0 = time.perf_counter()
            root = make_store(work, n, args.dim, args.chunk)
            os.sync()  # the store's pages on disk, not dirty in memory, before anything is measured
            print(f"n={n}: store of {n * args.dim * 2 / 2**30:.2f} GiB written in {time.perf_counter() - t0:.0f} s", flush=True)
            for what in ("pass", "auto", "stream"):
                out = subprocess.run([sys.executable, "-c", CHILD, str(root), what], capture_output=True, text=True,
                                     check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                label = "one pass over every row (self-influence, TracIn self-scores)" if what == "pass" else \
                    f"top-10 query, --index {what} ({r['kind']})"
                row = [f"{n:,}", f"{n * args.dim * 2 / 2**30:.2f}", label, f"{r['peak_mb']:,.0f}",
                       f"{r['peak_mb'] - r['before_mb']:,.0f}", f"{1000 * r['seconds']:,.0f}", f"{os.getloadavg()[0]:.1f}"]
                saved.setdefault(str(n), {})[what] = row
                print(row, flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(saved))
    rows = [row for n in sorted(saved, key=int) for row in saved[n].values()]
    body = ("### Peak memory against n (synthetic fp16 stores, k = 4,096)\n\n"
            "Each row in a fresh process that fixes the allocator's thresholds as the command line does "
            "(trainfluence/runtime.py); peak resident set (VmHWM) of the whole process and its growth during "
            "the operation; time of one query (the second, warm) or of the pass. The store is read by positioned "
            "reads, block by block (64 MB of float32), never mapped whole.\n\n"
            "Times are only comparable at a low load average (last column: 2 cores, so 2.0 means both busy with "
            "other work; rows measured under load say so).\n\n"
            + table(["rows n", "store GiB", "operation", "peak RSS MB", "growth MB", "ms", "load average"], rows))
    print(body)
    update_section("memory", body)


if __name__ == "__main__":
    main()
