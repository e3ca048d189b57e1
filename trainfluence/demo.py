"""``trainfluence demo``: the whole pipeline on the embedded shapes data with 10% planted label noise.

train (a checkpoint per epoch) → gradient store → explain test predictions by training images → mislabel audit
against the planted truth → saliency with top-k masks and boxes against the ground-truth boxes → one
``index.html`` linking every part, and a short summary with the time of every stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .audit import AuditSettings, label_marks, run_audit
from .checkpoint import load_checkpoint
from .data import DataConfig, load_dataset
from .explain import explain
from .files import write_json
from .influence import InfluenceEngine
from .predict import Predictor
from .progress import write
from .report import html
from .report.figures import plt, save_figure
from .saliency.evaluate import METRICS
from .saliency.run import run_saliency
from .settings import to_dict
from .train import TrainConfig, train


@dataclass
class DemoSettings:
    train_size: int = 6000
    test_size: int = 1200
    epochs: int = 5
    label_noise: float = 0.1
    noise_seed: int = 0
    explain: int = 4  # test images explained by training images
    saliency_images: int = 4
    saliency_eval: int = 50  # test images in the saliency evaluation
    hessian_samples: int | None = 2000  # training images the curvature (EK-FAC factors) is estimated from
    randomization_images: int = 8
    methods: tuple[str, ...] = ("gradient", "guided_backprop", "integrated_gradients", "smoothgrad", "grad_cam", "occlusion")
    seed: int = 0

    @classmethod
    def quick(cls) -> "DemoSettings":
        """The same pipeline on less data, for a first look and for the tests."""
        return cls(train_size=1500, test_size=300, epochs=8, saliency_eval=12, explain=2, saliency_images=2,
                   randomization_images=2, methods=("gradient", "integrated_gradients", "grad_cam"), hessian_samples=600)


def _stage(timings: dict[str, float], name: str, start: float) -> None:
    timings[name] = time.perf_counter() - start
    write(f"demo: {name} done in {timings[name]:.1f} s")


def run_demo(out: Path, settings: DemoSettings, device: torch.device, cache_dir: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    cfg = DataConfig("shapes", train_size=settings.train_size, test_size=settings.test_size,
                     label_noise=settings.label_noise, noise_seed=settings.noise_seed)
    train_set, test_set = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    _stage(timings, "data", t0)

    t0 = time.perf_counter()
    fit = train(TrainConfig(epochs=settings.epochs, seed=settings.seed), train_set, test_set, out / "model", device)
    ckpt = load_checkpoint(out / "model" / "final.pt", device=device)
    _training_plot(fit, out / "training.png")
    _stage(timings, "train", t0)

    t0 = time.perf_counter()
    # the defaults of the CLI, with the curvature estimated from a sample (--hessian-samples) to keep the demo short
    engine = InfluenceEngine(ckpt, train_set, cache_dir=cache_dir, device=device,
                             hessian_samples=settings.hessian_samples)
    store = engine.build_cache()
    _stage(timings, "gradient store", t0)

    t0 = time.perf_counter()
    x, y = test_set.tensors(device=device)
    pred = Predictor(ckpt.model.eval())(x).argmax(1).cpu()
    wrong = torch.nonzero(pred != test_set.labels).flatten().tolist()
    right = torch.nonzero(pred == test_set.labels).flatten().tolist()
    half = settings.explain // 2
    chosen = (wrong[:half] + right)[: settings.explain]
    audit = run_audit(ckpt, train_set, test_set, AuditSettings(top=40, detail=4), lambda: engine, out / "audit", device)
    _stage(timings, "audit", t0)

    t0 = time.perf_counter()
    explained = explain(engine, train_set, test_set, chosen, 8, out / "explain", marks=label_marks(train_set, audit["review"]))
    _stage(timings, "explain", t0)

    t0 = time.perf_counter()
    sal = run_saliency(ckpt.model, test_set, right[: settings.saliency_images], list(settings.methods), "pred",
                       out / "saliency", evaluate=True, eval_size=settings.saliency_eval,
                       randomization_images=settings.randomization_images)
    _stage(timings, "saliency", t0)

    best = (sal["evaluation"]["best"], sal["evaluation"]["results"][sal["evaluation"]["best"]])
    summary = {
        "train_accuracy": fit["train_accuracy"], "test_accuracy": fit["test_accuracy"],
        "audit_rank_by": audit["rank_by"],
        "audit_recall_at_10pct": audit["metrics"][audit["rank_by"]]["recall_at_10pct"],
        "audit_roc_auc": audit["metrics"][audit["rank_by"]]["roc_auc"],
        "saliency_best": {"method": best[0], "pointing": best[1]["pointing"], "box_iou": best[1]["box_iou"],
                          "deletion_auc": best[1]["deletion_auc"], "insertion_auc": best[1]["insertion_auc"],
                          "rule": sal["evaluation"]["best_rule"]},
        "store": {"path": str(store.root), "examples": store.n, "dims": store.dim},
        "seconds": timings, "total_seconds": sum(timings.values()), "settings": to_dict(settings),
    }
    write_json(out / "summary.json", summary)
    _index(out, summary, explained, audit, sal, train_set)
    return summary


def _training_plot(fit: dict[str, Any], path: Path) -> None:
    epochs = [e["epoch"] for e in fit["epochs"]]
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.plot(epochs, [e["train_accuracy"] for e in fit["epochs"]], "o-", label="train (noisy labels)")
    ax.plot(epochs, [e["test_accuracy"] for e in fit["epochs"]], "s-", label="test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def _index(out: Path, summary: dict[str, Any], explained: dict[str, Any], audit: dict[str, Any], sal: dict[str, Any],
           train_set) -> None:
    esc = html.esc
    s = summary
    parts = [
        "<h1>trainfluence demo</h1>",
        "<p>The embedded <b>shapes</b> dataset (discs, squares, triangles, crosses, rings on cluttered backgrounds) "
        f"with <b>{esc(len(audit['suspects']) and audit['num_flipped'])} training labels flipped on purpose</b>. "
        "One command trained a CNN, cached per-example gradients, and asked: which training images made the model "
        "predict this? which labels are wrong? which pixels matter?</p>",
        "<p class='nav'>" + " ".join(html.link(p, t) for p, t in (("explain/index.html", "explanations"),
                                                                 ("audit/index.html", "mislabel audit"),
                                                                 ("saliency/index.html", "saliency"),
                                                                 ("summary.json", "summary.json"))) + "</p>",
        html.table(["", "value"], [["test accuracy", s["test_accuracy"]],
                                   [f"flipped labels found in the top 10% ({s['audit_rank_by']})", s["audit_recall_at_10pct"]],
                                   ["audit ROC AUC", s["audit_roc_auc"]],
                                   [f"pointing ↑ (best saliency method: {s['saliency_best']['method']})", s["saliency_best"]["pointing"]],
                                   [f"mean box IoU ↑ ({s['saliency_best']['method']})", s["saliency_best"]["box_iou"]]]),
        "<h2>1. Training</h2>", html.img("training.png", "training curve", "figure"),
        "<h2>2. Which training images made the model predict this?</h2>",
        "<p class='muted'>For each test image: the training images whose up-weighting would most lower (helpful, green) "
        "and most raise (harmful, red) its loss — Koh &amp; Liang influence, I_up,loss.</p>",
    ]
    for item in explained["explanations"]:
        parts.append(html.img(f"explain/{item['figure']}", f"explanation of test image {item['test']['index']}", "figure"))
    parts.append("<h2>3. Which training labels are wrong?</h2>")
    rows = [[name, m["recall_at_10pct"], m["roc_auc"], m["average_precision"]] for name, m in audit["metrics"].items()]
    parts.append(html.table(["score", "recall at 10% inspected", "ROC AUC", "average precision"], rows))
    parts.append("<div class='grid'>")
    for sus in audit["suspects"][:16]:
        rel = f"audit/thumbs/train-{sus['index']}.png"
        flip = " flip" if sus.get("is_flipped") else ""
        parts.append(f"<div class='card{flip}'>{html.img(rel, 'suspect ' + str(sus['index']))}<br>"
                     f"{esc(sus['given_label'])} → <b>{esc(sus['suggested_label'])}</b></div>")
    parts.append("</div><p>" + html.link("audit/index.html", "the full audit") + " (red frames: planted flips)</p>")
    parts.append("<h2>4. Which pixels matter?</h2>" + html.img("saliency/saliency_grid.png", "saliency maps", "figure"))
    res = sal["evaluation"]["results"]
    parts.append(f"<p class='muted'>↑ higher is better, ↓ lower is better; {html.esc(sal['evaluation']['best_rule'])}.</p>")
    parts.append(html.table(["method", *[label for _, label in METRICS.values()]],
                            [[m, *[r.get(c, "") for c in METRICS]] for m, r in res.items()]))
    parts.append("<h2>Time per stage</h2>" + html.table(["stage", "seconds"], [[k, v] for k, v in s["seconds"].items()]))
    html.write_page(out / "index.html", "trainfluence demo", "\n".join(parts))
