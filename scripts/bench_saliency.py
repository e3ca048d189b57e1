"""Saliency benchmark (issue: pixel saliency): on the shapes test set with the default model, pointing-game
accuracy, mean box IoU, deletion/insertion AUC and time per image for every method beside a random map; the
box threshold's effect on IoU; integrated gradients' completeness error vs steps.

    python scripts/bench_saliency.py [--checkpoint runs/demo/model/final.pt]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import table, update_section  # noqa: E402

from trainfluence.checkpoint import load_checkpoint  # noqa: E402
from trainfluence.data import DataConfig, load_dataset  # noqa: E402
from trainfluence.saliency import METHODS, attribute_full  # noqa: E402
from trainfluence.saliency.evaluate import evaluate_methods  # noqa: E402
from trainfluence.saliency.postprocess import box_from_map, box_iou, importance  # noqa: E402
from trainfluence.saliency.run import DEFAULT_SETTINGS  # noqa: E402
from trainfluence.train import TrainConfig, train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="default: train the default CNN on shapes (6 epochs)")
    ap.add_argument("--images", type=int, default=300)
    args = ap.parse_args()
    if args.checkpoint is None:
        work = Path(tempfile.mkdtemp(prefix="bench_saliency_"))
        cfg = DataConfig("shapes")
        train(TrainConfig(), load_dataset(cfg, "train"), load_dataset(cfg, "test"), work, progress=False)
        args.checkpoint = str(work / "final.pt")
    ckpt = load_checkpoint(args.checkpoint)
    test = load_dataset(ckpt.meta.data_config, "test")
    x, _ = test.tensors(slice(0, args.images))
    boxes = test.boxes[: args.images]
    methods = [m for m in METHODS if m != "vargrad"]
    res = evaluate_methods(ckpt.model, x, boxes, methods, DEFAULT_SETTINGS)
    rows = [[m, r["pointing"], r["box_iou"], r["deletion_auc"], r["insertion_auc"], r["seconds_per_image"] * 1e3]
            for m, r in res.items()]
    # IoU by threshold for three methods, and IG completeness vs steps
    with torch.no_grad():
        pred = ckpt.model(x).argmax(1)
    thr_rows = []
    for m in ("guided_backprop", "grad_cam", "occlusion"):
        imp = importance(attribute_full(ckpt.model, x, m, pred, **DEFAULT_SETTINGS.get(m, {})).attr)
        thr_rows.append([m, *[float(np.mean([box_iou(box_from_map(a, t), b) for a, b in zip(imp, boxes)])) for t in (0.2, 0.3, 0.5)]])
    ig_rows = []
    for steps, rule in ((20, "midpoint"), (50, "midpoint"), (50, "gauss_legendre"), (100, "midpoint"), (200, "midpoint")):
        r = attribute_full(ckpt.model, x[:100], "integrated_gradients", pred[:100], steps=steps, rule=rule)
        rel = (r.info["delta"].abs() / (r.info["target_values"] - r.info["baseline_values"]).abs()).numpy()
        ig_rows.append([steps, rule, 100 * rel.mean(), 100 * np.median(rel), 100 * rel.max()])
    best = max(res.items(), key=lambda kv: kv[1]["pointing"] if kv[0] != "random map" else -1)
    body = f"""### Saliency on the shapes test set ({args.images} images, default CNN, predicted class)

Pointing: the most important pixel inside the ground-truth box ±2 px; box: largest connected region above 30% of
the map's maximum; deletion (lower is better) and insertion (higher is better) AUC of the class probability.
Best pointing: **{best[0]} {best[1]['pointing']:.3f}** (box IoU {best[1]['box_iou']:.3f}).

{table(["method", "pointing", "mean box IoU", "deletion AUC", "insertion AUC", "ms per image"], rows)}

Mean box IoU by threshold (fraction of the map's maximum; 0.3 is the fixed policy):

{table(["method", "0.2", "0.3", "0.5"], thr_rows)}

Integrated gradients, completeness error |Σ attr − (F(x) − F(0))| / |F(x) − F(0)| in % (100 images):

{table(["steps", "rule", "mean %", "median %", "max %"], ig_rows)}
"""
    print(body)
    update_section("saliency", body)


if __name__ == "__main__":
    main()
