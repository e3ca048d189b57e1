"""Time the full ``trainfluence demo`` (the README's first command) stage by stage.

Runs the demo exactly as a user would, in a fresh output and cache folder (nothing reused), as a subprocess, and
writes the per-stage seconds it measured and the wall time of the whole command into BENCHMARKS.md.

    python scripts/bench_demo.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import table, update_section  # noqa: E402


STAGES = ["data", "train", "gradient store", "explain", "audit", "saliency"]  # the demo's order


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="time demo --quick instead (the same pipeline on less data)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_demo_"))
    cmd = [sys.executable, "-m", "trainfluence", "demo", "--out", str(work / "demo"), "--cache-dir", str(work / "cache")]
    if args.quick:
        cmd.append("--quick")
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    summary = json.loads((work / "demo" / "summary.json").read_text())
    seconds = summary["seconds"]
    best = summary["saliency_best"]
    body = "\n".join([
        f"### `trainfluence demo{' --quick' if args.quick else ''}`: time per stage (fresh folders, nothing cached)",
        "",
        f"Shapes, {summary['settings']['train_size']:,} training images with {summary['settings']['label_noise']:.0%} "
        f"flipped labels, {summary['settings']['epochs']} epochs. **Whole command: {wall:.0f} s wall** (target ≤ {60 if args.quick else 180} s), "
        f"of which the stages below {sum(seconds.values()):.0f} s; the rest is starting Python and importing torch.",
        "",
        table(["stage", "seconds"], [[k, seconds[k]] for k in STAGES if k in seconds]),
        "",
        f"Results of this run: test accuracy {summary['test_accuracy']:.4f}; audit ({summary['audit_rank_by']}) finds "
        f"{summary['audit_recall_at_10pct']:.1%} of the flipped labels in the top 10% (ROC AUC "
        f"{summary['audit_roc_auc']:.4f}); best saliency method {best['method']} (pointing {best['pointing']:.3f}, box IoU "
        f"{best['box_iou']:.3f}).",
    ])
    print(body)
    update_section("demo" + ("_quick" if args.quick else ""), body)


if __name__ == "__main__":
    main()
