"""Models, checkpoints and training."""

from __future__ import annotations

import json

import pytest
import torch

from trainfluence.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from trainfluence.data import DataConfig, load_dataset
from trainfluence.errors import UserError
from trainfluence.models import MODELS, build_model, count_parameters
from trainfluence.train import TrainConfig, evaluate, train


def test_default_cnn_size_and_models_build():
    assert 40_000 <= count_parameters(build_model("cnn", 5, 3, 32)) <= 60_000
    for arch in MODELS:
        for c, s in ((1, 28), (3, 32)):
            model = build_model(arch, 7, c, s).eval()
            assert model(torch.zeros(2, c, s, s)).shape == (2, 7)


def test_user_factory_module_callable():
    model = build_model("torch.nn:Identity", 3, 3, 32, trusted=True)  # any importable callable returning a Module
    assert isinstance(model, torch.nn.Identity)
    with pytest.raises(UserError, match="cannot load model factory"):
        build_model("no_such_module:f", 3, 3, 32, trusted=True)
    with pytest.raises(UserError, match="not a registered one"):  # only the user can choose code to run
        build_model("torch.nn:Identity", 3, 3, 32)


def test_training_reaches_90_percent_on_shapes(shapes_run):
    result = shapes_run["result"]
    assert result["test_accuracy"] >= 0.90
    assert len(result["epochs"]) == 5
    metrics = json.loads((shapes_run["out"] / "metrics.json").read_text())
    assert metrics["test_accuracy"] == result["test_accuracy"]
    for e in range(1, 6):
        assert (shapes_run["out"] / f"epoch-{e}.pt").is_file()


def test_checkpoint_round_trip_identical_outputs(shapes_run):
    ckpt = load_checkpoint(shapes_run["checkpoint"])
    assert ckpt.meta.arch == "cnn" and ckpt.meta.epoch == 5 and ckpt.meta.weight_decay == 5e-4
    assert ckpt.meta.classes == shapes_run["train"].classes
    assert ckpt.meta.data_config == shapes_run["train"].config
    x, _ = shapes_run["test"].tensors(slice(0, 64))
    again = load_checkpoint(shapes_run["checkpoint"])
    with torch.no_grad():
        assert torch.equal(ckpt.model(x), again.model(x))
    # the re-loaded model has the recorded accuracy
    assert evaluate(ckpt.model, shapes_run["test"])["accuracy"] == pytest.approx(ckpt.meta.metrics["test_accuracy"])


def test_training_deterministic_under_seed(tmp_path):
    cfg = DataConfig(train_size=256, test_size=64)
    tr, te = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    a = train(TrainConfig(epochs=1, seed=3), tr, te, tmp_path / "a", progress=False)
    b = train(TrainConfig(epochs=1, seed=3), tr, te, tmp_path / "b", progress=False)
    train(TrainConfig(epochs=1, seed=4), tr, te, tmp_path / "c", progress=False)
    sa, sb, sc = (load_checkpoint(tmp_path / d / "final.pt") for d in "abc")
    assert sa.content_hash == sb.content_hash != sc.content_hash
    assert a["train_accuracy"] == b["train_accuracy"]
    # the training-dynamics records are deterministic too
    assert (tmp_path / "a" / "epoch-1.logits.npy").read_bytes() == (tmp_path / "b" / "epoch-1.logits.npy").read_bytes()


def test_checkpoint_for_other_architecture_or_classes(tmp_path, shapes_run):
    ckpt = load_checkpoint(shapes_run["checkpoint"])
    wrong = build_model("logreg", 5, 3, 32)
    path = save_checkpoint(tmp_path / "wrong.pt", wrong, ckpt.meta)  # cnn metadata, logreg weights
    with pytest.raises(UserError, match="does not fit architecture 'cnn'"):
        load_checkpoint(path)
    mnist_like = load_dataset(DataConfig(train_size=10, test_size=10, image_size=28), "train")
    with pytest.raises(UserError, match="expects 3x32x32"):
        check_compatible(ckpt.meta, mnist_like)
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "garbage.pt")
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_resume_continues_bit_for_bit(tmp_path):
    cfg = DataConfig(train_size=256, test_size=64)
    tr, te = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    settings = TrainConfig(epochs=3, seed=5)
    full = train(settings, tr, te, tmp_path / "full", progress=False)
    train(settings, tr, te, tmp_path / "cut", progress=False)
    for name in ("epoch-3.pt", "final.pt", "metrics.json"):  # what a kill during epoch 3 leaves behind
        (tmp_path / "cut" / name).unlink()
    resumed = train(settings, tr, te, tmp_path / "cut", progress=False, resume=True)
    a, b = load_checkpoint(tmp_path / "full" / "final.pt"), load_checkpoint(tmp_path / "cut" / "final.pt")
    assert a.content_hash == b.content_hash and b.meta.run_id == resumed["run_id"] == load_checkpoint(tmp_path / "cut" / "epoch-1.pt").meta.run_id
    assert [e["train_accuracy"] for e in resumed["epochs"]] == [e["train_accuracy"] for e in full["epochs"]]
    with pytest.raises(UserError, match="other settings"):
        train(TrainConfig(epochs=3, seed=6), tr, te, tmp_path / "cut", progress=False, resume=True)
    with pytest.raises(UserError, match="no epoch-E.pt checkpoints"):
        train(settings, tr, te, tmp_path / "empty", progress=False, resume=True)


@pytest.mark.parametrize("arch", ["cnn", "view"])
def test_predictor_matches_the_model_and_leaves_it_untouched(arch):
    """Batched inference runs channels-last on the CPU (faster convolutions) with the model's own values to float
    rounding, over several batches; a model whose code refuses that layout (a view after a convolution) falls back;
    the user's parameters keep their layout."""
    from tests.nets import ViewNet
    from trainfluence.predict import CPU_BATCH, Predictor

    torch.manual_seed(0)
    model = (build_model("cnn", 5, 3, 16) if arch == "cnn" else ViewNet(3, 16, 5)).eval()
    x = torch.randn(2 * CPU_BATCH + 37, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    predict = Predictor(model)
    assert predict.layout  # channels-last copies of the 4-D weights, planned for both
    got = predict(x)
    assert bool(predict.layout) == (arch == "cnn")  # ViewNet refused the layout and runs in the default one
    assert got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert all(p.is_contiguous() for p in model.parameters())
    assert not got.requires_grad


def test_training_runs_channels_last_when_the_model_accepts_it_and_writes_the_default_layout(tmp_path):
    """The training loop's own model runs channels-last on the CPU when its code accepts it (a view after a
    convolution does not: it trains in the default layout); the conversion keeps the values and the mode;
    checkpoints are written in the default layout either way."""
    from tests.nets import ViewNet
    from trainfluence.layout import train_channels_last

    probe = torch.randn(2, 3, 16, 16)
    view = ViewNet(3, 16, 5)
    assert not train_channels_last(view, probe)
    assert all(p.is_contiguous() for p in view.parameters())
    assert view.training  # the probe left the mode as it was
    torch.manual_seed(0)
    cnn = build_model("cnn", 5, 3, 16)
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    assert train_channels_last(cnn, probe) and cnn.training
    assert cnn.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())

    data = _tiny_shapes()
    for arch, expected in (("cnn", True), ("tests.nets:view_net", False)):
        result = train(TrainConfig(epochs=1, seed=0, arch=arch), *data, tmp_path / arch, progress=False)
        assert result["channels_last"] is expected, arch
        blob = torch.load(tmp_path / arch / "final.pt", weights_only=True)
        assert all(t.is_contiguous() for t in blob["state_dict"].values()), arch
        assert load_checkpoint(tmp_path / arch / "final.pt", arch=arch).model is not None


def _tiny_shapes():
    cfg = DataConfig("shapes", train_size=64, test_size=16, image_size=16)
    return load_dataset(cfg, "train"), load_dataset(cfg, "test")
