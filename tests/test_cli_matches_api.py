"""The command line and the Python API share one set of defaults and one pipeline: a store built by ``cache`` is
the one ``explain`` and ``audit`` reuse (no second gradient pass), and what the CLI writes — ranked training ids
and their scores — equals what the API returns for the same inputs."""

from __future__ import annotations

import csv
import json

import numpy as np

from trainfluence.checkpoint import load_checkpoint
from trainfluence.cli import main
from trainfluence.data import DataConfig, load_dataset
from trainfluence.influence import InfluenceEngine


def test_cache_then_explain_and_audit_reuse_one_store_and_match_the_api(shapes_run, tmp_path, capsys):
    ckpt = str(shapes_run["checkpoint"])
    data = ["--train-size", "400", "--test-size", "30"]
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert main(["cache", "--checkpoint", ckpt, *data, *cache]) == 0
    assert "built 1 chunk(s)" in capsys.readouterr().out
    assert main(["explain", "--checkpoint", ckpt, *data, *cache, "--index", "3", "11", "--top", "7",
                 "--out", str(tmp_path / "explain")]) == 0
    out = capsys.readouterr().out
    assert "reused (no gradient pass)" in out
    assert "solve: ekfac: the Kronecker-factored approximation of the curvature from 400 examples, inverted exactly" in out
    assert len(list((tmp_path / "cache").glob("grads-*"))) == 1

    meta = load_checkpoint(ckpt).meta
    cfg = DataConfig(**{**meta.data_config.__dict__, "train_size": 400, "test_size": 30})
    train, test = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    engine = InfluenceEngine(ckpt, train, cache_dir=tmp_path / "api-cache")  # the API's defaults, its own cache
    top = engine.top_k(test.tensors([3, 11]), 7)
    report = json.loads((tmp_path / "explain" / "influence.json").read_text())
    for row, item in enumerate(report["explanations"]):
        assert [e["index"] for e in item["helpful"]] == top.helpful_index[row].tolist()
        assert [e["index"] for e in item["harmful"]] == top.harmful_index[row].tolist()
        np.testing.assert_allclose([e["score"] for e in item["helpful"]], top.helpful_score[row], rtol=1e-5)
        shown = item["helpful"] + item["harmful"]
        np.testing.assert_allclose([e["first_order_loss_change"] for e in shown],
                                   [-e["score"] / 400 for e in shown], rtol=1e-6)
        assert not any("leverage" in e for e in shown)  # ekfac (the default here): no Newton step, and the report says so
    assert "ekfac approximates it" in report["newton_step"]
    assert "an approximation of H" in (tmp_path / "explain" / "index.html").read_text()
    assert report["settings"] == engine.describe()

    assert main(["audit", "--checkpoint", ckpt, *data, *cache, "--score", "self_influence", "loss",
                 "--out", str(tmp_path / "audit")]) == 0
    assert "gradient store: reused (no gradient pass)" in capsys.readouterr().out
    with (tmp_path / "audit" / "suspects.csv").open() as f:
        rows = list(csv.DictReader(f))
    api = engine.self_influence()
    ids = [int(r["index"]) for r in rows]
    assert ids == np.argsort(-api, kind="stable").tolist()
    np.testing.assert_allclose([float(r["self_influence"]) for r in rows], api[ids], rtol=1e-5)
