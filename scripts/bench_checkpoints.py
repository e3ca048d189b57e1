"""Which epoch checkpoints of one run to average (issue: influence a user can trust at the defaults).

bench_lds.py measures the ensemble of all the epoch checkpoints of the first model's run.  This script asks which
of them carry the gain: it computes the defaults' influence τₑ at every epoch checkpoint e of that run (the same
models, data, halves and retrained test losses as bench_lds, read from its ``--work`` folder, so run bench_lds.py
for the part first), then the LDS of each checkpoint alone and of averages of subsets — each subset costs one
influence computation per member.

    python scripts/bench_lds.py --part cnn --seeds 3      # trains the models and halves (cached)
    python scripts/bench_checkpoints.py --part cnn --seeds 3
    python scripts/bench_checkpoints.py --part mlp
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lds import PARTS, add_protocol_args, lds_per_test, mnist_subset, ours, paired_interval, subset_losses  # noqa: E402
from benchlib import table, update_section  # noqa: E402

from trainfluence.checkpoint import load_checkpoint  # noqa: E402
from trainfluence.train import epoch_checkpoints  # noqa: E402


OTHER_SEEDS = """  Last column: the LDS against the halves' models of seeds 1, 2, …
only.  The run starts from the same initial weights as each half's seed-0 model, which could favour checkpoints
near that start; this column leaves those models out."""


def subsets(epochs: int) -> list[tuple[str, list[int]]]:
    """(name, 0-based checkpoint indices): each alone, the first and the last, the first two and the last, all."""
    last = epochs - 1
    out = [(f"epoch {e + 1} alone", [e]) for e in range(epochs)]
    out += [(f"epochs 1 and {epochs} (first and last)", [0, last])]
    if epochs > 3:
        out += [(f"epochs 1, 2 and {epochs}", [0, 1, last]), (f"the last 3 (epochs {epochs - 2}–{epochs})", [last - 2, last - 1, last])]
    out += [(f"all {epochs}", list(range(epochs)))]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(ap, ["mlp", "cnn"])
    ap.add_argument("--no-write", action="store_true", help="print only; do not update BENCHMARKS.md")
    args = ap.parse_args()
    _, wd, _, default_seeds = PARTS[args.part]
    args.seeds = args.seeds or default_seeds
    work = Path(args.work) / args.part
    paths = epoch_checkpoints(work / "model-0")
    if not paths:
        sys.exit(f"no epoch checkpoints in {work / 'model-0'}: run scripts/bench_lds.py --part {args.part} first")
    train_set, test_set = mnist_subset(args)
    masks, per_seed = subset_losses(args, args.part, train_set, test_set, load_checkpoint(paths[-1]).model, work,
                                    per_seed=True)
    # the run starts from the same initial weights as the halves' seed-0 models: the last column leaves them out
    truths = {"all": per_seed.mean(1)} | ({"other seeds": per_seed[:, 1:].mean(1)} if args.seeds > 1 else {})
    taus, seconds = [], []
    for path in paths:
        start = time.perf_counter()
        tau, _ = ours([load_checkpoint(path).model], train_set, test_set, wd, work)
        taus.append(tau)
        seconds.append(time.perf_counter() - start)
        print(f"{path.name}: {seconds[-1]:.1f} s", flush=True)
    averaged = {name: np.mean([taus[i] for i in idx], axis=0) for name, idx in subsets(len(paths))}
    rho = {truth: {name: lds_per_test(tau, masks, losses) for name, tau in averaged.items()} for truth, losses in truths.items()}
    final = f"epoch {len(paths)} alone"
    rows = []
    for name, idx in subsets(len(paths)):
        mean, lo, hi = paired_interval(rho["all"][name], rho["all"][final])
        rows.append([name, float(np.nanmean(rho["all"][name])), "—" if name == final else f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]",
                     sum(seconds[i] for i in idx)] + [float(np.nanmean(rho["other seeds"][name]))] * ("other seeds" in rho))
    title = {"mlp": "MLP 784-128-128-10", "cnn": "default CNN"}[args.part]
    body = f"""### LDS of the epoch checkpoints of one run, {title}: which to average

The defaults' influence (EK-FAC, damping auto) at each of the {len(paths)} epoch checkpoints of the first model's run
in bench:lds_{args.part} (its last checkpoint is that table's single model), and of their averages; the same
{args.n:,} training and {args.tests} test images, {args.subsets} halves and {args.seeds} model(s) per half.
Seconds: the members' influence computations, summed (each measured alone in this run).

{table(["checkpoints averaged", "LDS", "row − last alone [95% CI]", "seconds"]
        + ["LDS, halves' models of seeds ≥ 1 only"] * ("other seeds" in rho), rows)}

Row − last alone: the mean over test points of the row's Spearman minus the last checkpoint's, with its 95% paired
bootstrap interval over the {args.tests} test points (10,000 draws).{OTHER_SEEDS if "other seeds" in rho else ""}
"""
    print(body)
    if not args.no_write:
        update_section(f"lds_checkpoints_{args.part}", body)


if __name__ == "__main__":
    main()
