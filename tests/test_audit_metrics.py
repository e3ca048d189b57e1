"""Detection metrics against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from trainfluence.audit.metrics import (all_metrics, average_precision, precision_recall_f1_at_k, recall_at_fraction,
                                        recall_curve, roc_auc, roc_curve)

SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
TRUTH = np.array([1, 0, 1, 0, 0, 1, 0, 0, 0, 0], dtype=bool)  # flipped at ranks 1, 3, 6


def test_recall_at_fraction():
    assert recall_at_fraction(SCORES, TRUTH, 0.1) == pytest.approx(1 / 3)  # top 1
    assert recall_at_fraction(SCORES, TRUTH, 0.3) == pytest.approx(2 / 3)  # top 3
    assert recall_at_fraction(SCORES, TRUTH, 0.5) == pytest.approx(2 / 3)
    assert recall_at_fraction(SCORES, TRUTH, 0.6) == pytest.approx(1.0)


def test_roc_auc_hand_computed():
    # positives at ranks 1, 3, 6 outrank 7, 6 and 4 of the 7 negatives: (7 + 6 + 4) / 21
    assert roc_auc(SCORES, TRUTH) == pytest.approx(17 / 21)
    assert roc_auc(-SCORES, TRUTH) == pytest.approx(4 / 21)
    assert roc_auc(np.ones(10), TRUTH) == pytest.approx(0.5)  # ties count one half
    assert roc_auc(np.array([2.0, 1.0, 1.0, 0.0]), np.array([1, 1, 0, 0], bool)) == pytest.approx(3.5 / 4)


def test_average_precision_hand_computed():
    # precision at each hit: 1/1, 2/3, 3/6 → AP = (1 + 2/3 + 1/2) / 3
    assert average_precision(SCORES, TRUTH) == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)
    # tied scores enter together: one threshold holding 1 hit in 2 → precision 1/2 at recall 1
    assert average_precision(np.array([1.0, 1.0, 0.0]), np.array([0, 1, 0], bool)) == pytest.approx(0.5)


def test_precision_recall_f1_at_number_flipped():
    m = precision_recall_f1_at_k(SCORES, TRUTH)
    assert m["k"] == 3 and m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)


def test_curves():
    fractions, recall = recall_curve(SCORES, TRUTH, points=11)
    assert recall[0] == 0 and recall[-1] == 1 and recall[1] == pytest.approx(1 / 3) and recall[6] == pytest.approx(1)
    fpr, tpr = roc_curve(SCORES, TRUTH)
    assert np.trapezoid(tpr, fpr) == pytest.approx(17 / 21)  # the area under the curve is the AUC


def test_all_metrics_keys_and_random_baseline():
    rng = np.random.default_rng(0)
    truth = rng.random(20000) < 0.1
    m = all_metrics(rng.random(20000), truth)
    assert m["roc_auc"] == pytest.approx(0.5, abs=0.02) and m["recall_at_10pct"] == pytest.approx(0.1, abs=0.02)
    assert set(m) >= {"recall_at_5pct", "recall_at_30pct", "average_precision", "f1_at_num_flipped"}
