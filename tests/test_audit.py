"""The mislabel audit end to end: planted flips found, CSV consistent with metrics.json, HTML escaped, errors."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch

from trainfluence.audit import AuditSettings, run_audit
from trainfluence.audit.fix import fix_experiment
from trainfluence.audit.scores import loss_score, margin_score, tracin_score
from trainfluence.checkpoint import load_checkpoint
from trainfluence.cli import main
from trainfluence.data import DataConfig, load_dataset
from trainfluence.influence import InfluenceEngine

from .test_cli_errors import assert_one_line_error


def test_numpy_scores():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    labels = np.array([0, 1])
    np.testing.assert_allclose(loss_score(probs, labels), [-np.log(0.7), -np.log(0.1)])
    np.testing.assert_allclose(margin_score(probs, labels), [0.2 - 0.7, 0.8 - 0.1])
    np.testing.assert_allclose(tracin_score(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([0.5, 0.1])), [0.8, 1.4])


def test_tracin_weights_by_hand(shapes_run):
    """tracin (logits) = Σₜ wₜ ‖softmax(fₜ(x)) − onehot(y)‖² over the epoch checkpoints, wₜ = ηₜ or 1."""
    from trainfluence.audit.scores import SCORES, AuditContext, predict_proba, run_metas

    ckpt, train = load_checkpoint(shapes_run["checkpoint"]), shapes_run["train"].subset(range(600))
    paths = [p for p, _ in run_metas(ckpt)[0]]
    assert len(paths) == 5
    onehot = np.eye(len(train.classes))[train.labels.numpy()]
    norms = np.stack([((predict_proba(load_checkpoint(p).model, train, "cpu") - onehot) ** 2).sum(1) for p in paths])
    lrs = np.array([load_checkpoint(p).meta.optimizer["lr"] for p in paths])
    ctx = AuditContext(ckpt, train, torch.device("cpu"), lambda: None)
    np.testing.assert_allclose(SCORES["tracin"](ctx), lrs @ norms, rtol=1e-9)
    ctx.tracin_weights = "uniform"
    np.testing.assert_allclose(SCORES["tracin"](ctx), norms.sum(0), rtol=1e-9)


@pytest.fixture(scope="module")
def audited(shapes_run, tmp_path_factory):
    """Audit the shapes model with 10% of its training labels flipped (the model learnt the clean labels)."""
    ckpt = load_checkpoint(shapes_run["checkpoint"])
    cfg = dataclasses.replace(ckpt.meta.data_config, label_noise=0.1, noise_seed=3)
    train, test = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    # one class name that would run as script if it were not escaped
    train = dataclasses.replace(train, classes=["<script>alert(1)</script>", *train.classes[1:]])
    out = tmp_path_factory.mktemp("audit")

    def engine():
        return InfluenceEngine(ckpt.model, train, solver="exact", params="last", damping=0.01,
                               weight_decay=ckpt.meta.weight_decay, cache_dir=out / "cache")

    report = run_audit(ckpt, train, test, AuditSettings(top=20, detail=2), engine, out / "report", torch.device("cpu"))
    return {"report": report, "out": out / "report", "train": train, "test": test, "checkpoint": shapes_run["checkpoint"]}


def test_audit_finds_most_planted_flips(audited):
    m = audited["report"]["metrics"]
    assert audited["report"]["num_flipped"] == 400
    assert m["tracin"]["recall_at_10pct"] >= 0.8 and m["tracin"]["roc_auc"] >= 0.95
    assert m["fused"]["recall_at_10pct"] >= 0.8 and m["aum"]["roc_auc"] >= 0.95 and audited["report"]["rank_by"] == "fused"
    assert any("that epoch's checkpoint predicts" in n for n in audited["report"]["notes"])  # fused says its branch
    assert m["self_influence"]["recall_at_10pct"] >= 0.8
    assert m["random"]["roc_auc"] == pytest.approx(0.5, abs=0.06)
    assert audited["report"]["suspects"][0]["is_flipped"]


def test_csv_consistent_with_metrics(audited):
    out, train = audited["out"], audited["train"]
    report = json.loads((out / "metrics.json").read_text())
    with (out / "suspects.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(train) and [int(r["rank"]) for r in rows] == list(range(1, len(train) + 1))
    assert {"index", "given_label", "suggested_label", "suggested_probability", "is_flipped", *report["settings"]["scores"]} <= set(rows[0])
    ranked = [float(r[report["rank_by"]]) for r in rows]
    assert ranked == sorted(ranked, reverse=True)
    flipped = np.array([int(r["is_flipped"]) for r in rows], dtype=bool)
    assert flipped.sum() == report["num_flipped"]
    k = round(0.1 * len(rows))
    assert flipped[:k].sum() / flipped.sum() == pytest.approx(report["metrics"][report["rank_by"]]["recall_at_10pct"])
    assert [s["index"] for s in report["suspects"]] == [int(r["index"]) for r in rows[:20]]
    for s in report["suspects"]:
        assert s["suggested_label"] in train.classes and s["self_influence_label"] in train.classes


def test_html_escapes_labels_and_links_resolve(audited):
    out = audited["out"]
    page = (out / "index.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    import re

    for src in re.findall(r'(?:src|href)="([^"]+)"', page):
        assert (out / src).is_file(), src
    assert (out / "recall_vs_inspected.png").is_file() and (out / "roc.png").is_file()


def test_fix_experiment_mechanics(shapes_run, tmp_path):
    cfg = DataConfig("shapes", train_size=300, test_size=100, label_noise=0.2, noise_seed=1)
    train, test = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    from trainfluence.train import TrainConfig, train as fit

    fit(TrainConfig(epochs=1), train, test, tmp_path / "m", progress=False)
    ckpt = load_checkpoint(tmp_path / "m" / "final.pt")
    flips = np.array(train.noise.indices[:10])
    suggested = train.clean_labels.numpy().copy()  # an oracle suggestion: the true labels
    result = fix_experiment(ckpt, train, test, {"oracle": flips, "clean": np.setdiff1d(np.arange(300), flips)[:10]},
                            suggested, torch.device("cpu"))
    assert result["methods"]["oracle"]["labels_restored"] == 10 == result["methods"]["oracle"]["flipped_among_chosen"]
    assert result["methods"]["clean"]["labels_changed"] == 0 and result["methods"]["clean"]["labels_restored"] == 0
    # relabelling nothing retrains on the very same data with the checkpoint's own settings: the same model again
    assert result["methods"]["clean"]["test_accuracy_after"] == result["test_accuracy_before"]


def test_audit_cli_errors(capsys, shapes_run, tmp_path):
    code = main(["audit", "--checkpoint", str(shapes_run["checkpoint"]), "--score", "vibes", "--out", str(tmp_path)])
    assert_one_line_error(code, capsys.readouterr().err, "argument --score: invalid choice: 'vibes'")
    code = main(["audit", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path)])
    assert_one_line_error(code, capsys.readouterr().err, "not found")


def test_audit_estimates_the_noise_suggests_labels_and_marks_the_cut(audited, tmp_path):
    """The suggested cut is the confident-learning estimate; suggestions are measured; marks reach explain pages."""
    from trainfluence.audit import label_marks
    from trainfluence.audit.review import mark_text
    from trainfluence.explain import explain

    report, out, train = audited["report"], audited["out"], audited["train"]
    est = report["noise_estimate"]
    assert est["true_rate"] == 0.1 and abs(est["rate"] - 0.1) <= 0.03, est
    with (out / "suspects.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sum(int(r["within_cut"]) for r in rows) == est["count"]
    assert all(int(r["within_cut"]) == (int(r["rank"]) <= est["count"]) for r in rows)
    acc = report["suggestion_accuracy"]
    assert acc["suggested_is_original"] >= 0.9, acc  # the model learnt the clean labels: it knows the originals
    assert all(r["suggested_label"] != r["given_label"] for r in rows)
    page = (out / "index.html").read_text()
    assert "How many to review" in page and f"review the top <b>{est['count']}</b>" in page
    marks = label_marks(train, report["review"])
    assert sum(1 for m in marks.values() if m.get("planted_flip")) == 400
    assert sum(1 for m in marks.values() if "suspect_rank" in m) == est["count"]
    i = train.noise.indices[0]
    assert mark_text(marks[i]).startswith(f"flip (was {train.classes[train.noise.original_labels[0]]})")
    # every training image an explanation shows carries its mark, in the JSON, the table and the picture's caption
    engine = InfluenceEngine(load_checkpoint(audited["checkpoint"]).model, train, solver="exact", params="last",
                             damping=0.01, cache_dir=out.parent / "cache")
    result = explain(engine, train, audited["test"], [0], 30, tmp_path, marks=marks)
    shown = result["explanations"][0]["helpful"] + result["explanations"][0]["harmful"]
    assert all(e["label_check"] == marks.get(e["index"], {}) for e in shown)
    flagged = [mark_text(e["label_check"]) for e in shown if e["label_check"]]
    html_page = (tmp_path / "index.html").read_text()
    import html as html_lib

    missing = [text for text in flagged if html_lib.escape(text) not in html_page]  # escaped: a class name is text
    assert flagged and not missing, (missing, html_page[-3000:])


def test_refused_noise_estimate_end_to_end(capsys, tmp_path):
    """A model that has not learnt (one epoch at a vanishing learning rate): the audit command says on its line that
    the noise rate is not estimated and why, and the report shows no cut anywhere — not in the page, not in
    suspects.csv, not in metrics.json."""
    run = tmp_path / "run"
    assert main(["train", "--train-size", "120", "--test-size", "40", "--epochs", "1", "--lr", "1e-9",
                 "--label-noise", "0.1", "--out", str(run), "--device", "cpu"]) == 0
    out = tmp_path / "audit"
    capsys.readouterr()
    assert main(["audit", "--checkpoint", str(run / "final.pt"), "--label-noise", "0.1", "--top", "8", "--detail", "0",
                 "--solver", "exact", "--params", "last", "--out", str(out), "--device", "cpu"]) == 0
    console = capsys.readouterr()
    said = console.out + console.err
    assert "noise rate not estimated" in said and "more than half" in said, said[-2000:]
    report = json.loads((out / "metrics.json").read_text())
    est = report["noise_estimate"]
    assert est["rate"] > 0.5 and est["count"] == 0 and "train longer" in est["refusal"]
    with (out / "suspects.csv").open() as f:
        assert not any(int(r["within_cut"]) for r in csv.DictReader(f))
    page = (out / "index.html").read_text()
    assert "<b>Not estimated</b>" in page and "suggested cut" not in page and "review the top" not in page
