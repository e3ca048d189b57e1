"""Planted noise kinds, training-dynamics records and signals, the noise-rate estimate and suggested labels —
each against a closed form or a construction whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainfluence.audit.estimate import estimate_noise, suggest_labels
from trainfluence.audit.metrics import roc_auc
from trainfluence.audit.scores import SCORES, AuditContext, predict_proba, random_score, rank_average
from trainfluence.checkpoint import load_checkpoint
from trainfluence.data import DataConfig, load_dataset
from trainfluence.data.noise import confusable_classes, flip_labels, reference_probabilities
from trainfluence.dynamics import Dynamics
from trainfluence.errors import UserError
from trainfluence.models import build_model
from trainfluence.train import TrainConfig, train


def test_asymmetric_noise_sends_each_class_to_its_nearest_class():
    # three classes of flat images at brightness 0, 10 and 200 (± 2): nearest means 0↔1, and 2 → 1
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(100)
    images = (torch.tensor([0, 10, 200])[labels].view(-1, 1, 1, 1) + torch.randint(0, 3, (300, 1, 8, 8), generator=gen))
    images = images.clamp(0, 255).to(torch.uint8)
    assert confusable_classes(images, labels, 3).tolist() == [1, 0, 1]
    noisy, rec = flip_labels(labels, 3, 0.2, seed=5, kind="asymmetric", images=images)
    assert len(rec.indices) == 60 and rec.kind == "asymmetric"
    assert torch.nonzero(noisy != labels).flatten().tolist() == rec.indices
    assert rec.noisy_labels == [[1, 0, 1][o] for o in rec.original_labels]


def test_instance_noise_flips_ambiguous_images_to_their_runner_up_class():
    cfg = DataConfig("shapes", train_size=600, test_size=50, label_noise=0.2, noise_seed=0, noise_kind="instance")
    train_set = load_dataset(cfg, "train")
    clean = train_set.clean_labels
    probs = reference_probabilities(train_set.images, clean, train_set.num_classes)
    runner = probs.copy()
    runner[np.arange(600), clean.numpy()] = -1
    flipped = (train_set.labels != clean).numpy()
    assert flipped.sum() == 120 and train_set.noise.kind == "instance"
    assert (train_set.labels.numpy()[flipped] == runner.argmax(1)[flipped]).all()  # to the runner-up class
    p2 = runner.max(1)
    assert p2[flipped].mean() > 1.15 * p2[~flipped].mean()  # ambiguous images flipped more often (1.26 here)
    again = load_dataset(cfg, "train")
    assert torch.equal(again.labels, train_set.labels)  # deterministic
    # the random baseline draws from its own stream: not correlated with noise planted with the same seed
    assert roc_auc(random_score(600, 0), flipped) == pytest.approx(0.5, abs=0.08)


def test_dynamics_signals_by_hand():
    # 3 epochs, 2 examples, 3 classes; labels 0 and 2
    z = np.array([[[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]],
                  [[0.0, 1.0, 0.0], [0.0, 2.0, 1.5]],
                  [[3.0, 0.0, 0.0], [1.0, 2.5, 2.0]]], dtype=np.float32)
    d = Dynamics(z, np.array([0, 2]))
    np.testing.assert_allclose(d.margins(), [[1, -2], [-1, -0.5], [3, -0.5]])
    np.testing.assert_allclose(d.aum(), [1.0, -1.0])
    losses = F.cross_entropy(torch.tensor(z).reshape(6, 3), torch.tensor([0, 2] * 3), reduction="none").reshape(3, 2)
    np.testing.assert_allclose(d.avg_loss(), losses.mean(0).numpy(), rtol=1e-6)
    # example 0: right, wrong, right → one forgetting event; example 1 never right → T = 3
    np.testing.assert_array_equal(d.forgetting(), [1, 3])
    np.testing.assert_allclose(d.mean_probs(), torch.softmax(torch.tensor(z, dtype=torch.float64), 2).mean(0).numpy())
    np.testing.assert_allclose(rank_average(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])), [2 / 3] * 3)


def test_train_records_the_logits_each_step_was_taken_from(tmp_path):
    cfg = DataConfig("shapes", train_size=64, test_size=16)
    data = load_dataset(cfg, "train")
    tc = TrainConfig(epochs=2, batch_size=64, seed=3)  # one step per epoch: epoch 1 sees the initial model
    train(tc, data, None, tmp_path, progress=False)
    torch.manual_seed(tc.seed)
    initial = build_model(tc.arch, data.num_classes, data.in_channels, data.image_shape[1], trusted=True)
    with torch.no_grad():
        expected = initial(data.tensors()[0]).numpy()
    ckpt = load_checkpoint(tmp_path / "final.pt")
    ctx = AuditContext(ckpt, data, torch.device("cpu"), lambda: None)
    assert ctx.dynamics.logits.shape == (2, 64, data.num_classes)
    np.testing.assert_allclose(ctx.dynamics.logits[0], expected, atol=2e-2, rtol=1e-2)  # float16 record
    np.testing.assert_allclose(SCORES["aum"](ctx), -ctx.dynamics.aum())
    # final.pt holds the last epoch's weights: its predictions are the final model's, with no second pass
    assert ctx.is_final(1) and not ctx.is_final(0) and ctx.model_at(1) is ckpt.model
    np.testing.assert_array_equal(ctx.predicted_at(1), ctx.probs.argmax(1))
    np.testing.assert_array_equal(ctx.predicted_at(0), predict_proba(ctx.model_at(0), data, "cpu").argmax(1))
    # an edited record is refused by name, and the fused score falls back to what it can read, saying why
    (tmp_path / "epoch-2.logits.npy").write_bytes((tmp_path / "epoch-1.logits.npy").read_bytes())
    ctx = AuditContext(ckpt, data, torch.device("cpu"), lambda: None)
    with pytest.raises(UserError, match="do not match their checkpoint"):
        SCORES["aum"](ctx)
    np.testing.assert_allclose(SCORES["fused"](ctx), rank_average(SCORES["tracin"](ctx)))
    assert any("without training dynamics" in n for n in ctx.notes)
    # a record is only read against the images it was recorded on
    other = load_dataset(DataConfig("shapes", train_size=64, test_size=16, seed=1), "train")
    with pytest.raises(UserError, match="other images"):
        AuditContext(load_checkpoint(tmp_path / "epoch-1.pt"), other, torch.device("cpu"), lambda: None).dynamics


def test_noise_estimate_above_one_half_is_refused_not_shown():
    """A model that has not learnt the classes (near-uniform probabilities, a little noise in them) makes confident
    learning flag most labels: the rate is kept as measured but refused — no cut, a reason — while a planted 40%
    that the model sees through is still estimated."""
    rng = np.random.default_rng(3)
    n, k = 1500, 5
    given = rng.integers(0, k, n)
    untrained = rng.dirichlet(np.full(k, 50.0), n)  # every class near 1/k
    est = estimate_noise(given, untrained)
    assert est.rate > 0.5 and est.count == 0 and "more than half" in est.refusal and "train longer" in est.refusal
    true = rng.integers(0, k, n)
    flip = rng.random(n) < 0.4
    noisy = np.where(flip, (true + 1 + rng.integers(0, k - 1, n)) % k, true)
    probs = np.full((n, k), 0.05)
    probs[np.arange(n), true] = 0.8
    est = estimate_noise(noisy, probs)
    assert not est.refusal and est.rate == pytest.approx(flip.mean(), abs=1e-12) and est.count == int(flip.sum())


def test_confident_learning_recovers_a_planted_rate_and_its_pairs():
    rng = np.random.default_rng(0)
    n, k = 2000, 4
    true = rng.integers(0, k, n)
    pair = np.array([1, 2, 3, 0])  # true j is labelled pair[j] when flipped
    flip = rng.random(n) < 0.25
    given = np.where(flip, pair[true], true)
    probs = np.full((n, k), 0.1)
    probs[np.arange(n), true] = 0.7  # a model that knows the truth, 0.7 confident
    est = estimate_noise(given, probs)
    assert est.rate == pytest.approx(flip.mean(), abs=1e-12) and est.count == int(flip.sum())
    rates = est.flip_rates()
    for j in range(k):  # P(true = j | given = pair[j]) is what was planted
        i = pair[j]
        assert rates[i, j] == pytest.approx((flip & (true == j)).sum() / (given == i).sum(), abs=1e-12)
    assert {(p["given"], p["true"]) for p in est.top_pairs(list("abcd"))} == {("b", "a"), ("c", "b"), ("d", "c"), ("a", "d")}
    suggested = suggest_labels(given, probs)
    assert (suggested != given).all() and (suggested[flip] == true[flip]).all()


def test_early_learning_finds_the_least_memorised_epoch_and_measures_memorisation():
    from trainfluence.audit.scores import FUSED_FINAL, FUSED_MEMORISED, early_learning, fused_names

    rng = np.random.default_rng(1)
    n, k = 1500, 5
    true = rng.integers(0, k, n)
    flip = rng.random(n) < 0.2
    given = np.where(flip, (true + 1 + rng.integers(0, k - 1, n)) % k, true)
    knows = np.full((n, k), 0.05)
    knows[np.arange(n), true] = 0.8  # early learning: the model predicts the true class
    memorised = np.full((n, k), 0.05)
    memorised[np.arange(n), given] = 0.8  # later: it predicts the given (wrong) label
    untrained = rng.dirichlet(np.ones(k), n)
    stack = np.stack([untrained, knows, 0.5 * (knows + memorised), memorised])
    el = early_learning(given, stack, memorised)
    assert el.epoch == 1 and el.estimate.rate == pytest.approx(flip.mean(), abs=1e-12)
    assert el.rates[3] == 0.0 and el.rates[1] > el.rates[2]  # half memorised: the flips no longer stand out
    assert (el.estimate.flagged == flip).all()
    assert el.memorised == 1.0 and el.predicted_share(given, knows.argmax(1)) == 0.0
    assert early_learning(given, stack, knows).memorised == 0.0
    # fused's branch reads what the final model memorised since t, not its bare share: a run that memorised under
    # half of the flips (20 epochs, 30% uniform flips in the benchmark: 0.00 at t, 0.49 at the end) has memorised;
    # one whose checkpoint at t already predicted a share (30% asymmetric flips learnt as a pattern) has not
    half = np.where((np.arange(n) % 20 < 9)[:, None], memorised, knows)  # memorises 9 in 20 of every label
    share = early_learning(given, stack, half).memorised
    assert share == pytest.approx(0.45, abs=0.05) and fused_names(share - 0.0) == FUSED_MEMORISED
    assert fused_names(0.23 - 0.22) == FUSED_FINAL and fused_names(0.0) == FUSED_FINAL


def test_memorisation_onset_is_the_epoch_before_the_flagged_share_rises():
    from trainfluence.audit.scores import ONSET, memorisation_onset

    shares = [0.0, 0.02, 0.03, 0.05, 0.15, 0.4, 0.9]  # t = 1; the share first rises by ONSET at epoch 4
    read = []

    def share(e: int) -> float:
        read.append(e)
        return shares[e]

    assert ONSET == 0.1 and memorisation_onset(share, 1, 6) == 3 and read == [1, 2, 3, 4]  # stops at the first rise
    assert memorisation_onset(lambda e: shares[e], 4, 6) == 4  # already rising right after t: t itself
    assert memorisation_onset(lambda e: 0.2, 0, 6) == 6  # never rises: every epoch
    assert memorisation_onset(lambda e: shares[e], 1, 6, rise=0.025) == 2


def test_fused_reads_aum_and_tracin_before_memorisation_when_the_final_model_memorised():
    """The memorised branch, on a context whose checkpoints' predictions and records are given: flagged labels
    predicted by 0% at t (epoch 2), 5% at epoch 3, 40% at epoch 4 and 90% at the end (epoch 5), so memorisation sets
    in at epoch 4 and fused is the rank average of AUM and TracIn over epochs 1–3 — not over all five."""
    from types import SimpleNamespace

    from trainfluence.audit.estimate import NoiseEstimate
    from trainfluence.audit.scores import ONSET, EarlyLearning

    rng = np.random.default_rng(0)
    n, k, epochs = 400, 4, 5
    labels = rng.integers(0, k, n)
    flagged = np.zeros(n, bool)
    flagged[:100] = True
    wrong = (labels + 1) % k
    memorised_by = [0.0, 0.0, 0.05, 0.4, 0.9]  # the share of flagged labels each checkpoint predicts
    predicted = [np.where(flagged & (np.arange(n) >= 100 * share), wrong, labels) for share in memorised_by]
    metas = [SimpleNamespace(run_id="r", epoch=e + 1, optimizer={"lr": 0.1 * (e + 1)}) for e in range(epochs)]
    final = SimpleNamespace(path="final.pt", meta=metas[-1])
    ctx = AuditContext(final, SimpleNamespace(labels=torch.from_numpy(labels)), torch.device("cpu"), lambda: None)
    ctx._run = [(f"epoch-{e + 1}.pt", metas[e]) for e in range(epochs)]
    ctx._dynamics = Dynamics(rng.normal(size=(epochs, n, k)).astype(np.float32), labels)
    ctx._early = EarlyLearning(1, [0.3, 0.25, 0.2, 0.1, 0.0], NoiseEstimate(0.25, 100, np.eye(k) / k, flagged),
                               memorised=0.9)
    norms = rng.random((epochs, n))
    for e in range(epochs):
        ctx._predicted[e] = predicted[e]
        ctx._tracin_norms["logits", "", e] = norms[e]
    assert ctx.is_final(epochs - 1) and not ctx.is_final(epochs - 2)
    lrs = np.array([0.1, 0.2, 0.3])
    expected = rank_average(-ctx.dynamics.until(2).aum(), lrs @ norms[:3])
    np.testing.assert_allclose(SCORES["fused"](ctx), expected)
    assert not np.allclose(expected, rank_average(SCORES["aum"](ctx), SCORES["tracin"](ctx)))
    assert any(f"epoch 4's checkpoint predicts 40%, {ONSET * 100:.0f} points or more above epoch 2's" in note
               and "aum + tracin over epochs 1–3" in note for note in ctx.notes)
