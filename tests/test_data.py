"""Datasets: the embedded shapes generator, label noise, torchvision MNIST, image folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from trainfluence.data import DataConfig, flip_labels, load_dataset
from trainfluence.data.shapes import CLASSES, generate
from trainfluence.errors import UserError

from .conftest import MNIST_ROOT, needs_mnist


def test_shapes_deterministic_under_seed_and_different_across_seeds():
    a, b, c = generate(64, seed=3), generate(64, seed=3), generate(64, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.boxes, b.boxes)
    assert not torch.equal(a.images, c.images)
    assert (a.images.float() - c.images.float()).abs().mean() > 20  # not a near-copy
    train, test = generate(64, seed=3, stream=0), generate(64, seed=3, stream=1)
    assert not torch.equal(train.images, test.images)  # train and test are different draws


def test_shapes_defaults_and_classes():
    cfg = DataConfig()
    train, test = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    assert len(train) >= 5000 and len(test) >= 1000
    assert len(CLASSES) >= 4 and train.image_shape == (3, 32, 32)
    counts = torch.bincount(train.labels, minlength=len(CLASSES)).float()
    assert counts.min() / counts.max() > 0.85  # roughly balanced
    x, y = train[0]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and isinstance(y, int)
    # the stated normalisation leaves the data close to zero mean, unit variance
    xs, _ = train.tensors(slice(0, 2000))
    assert abs(float(xs.mean())) < 0.05 and abs(float(xs.std()) - 1) < 0.1


def test_shapes_boxes_inside_image_and_tight_around_object():
    g = generate(300, size=40, seed=1)
    for img, box, mask in zip(g.images, g.boxes, g.masks):
        x0, y0, x1, y1 = box.tolist()
        assert 0 <= x0 <= x1 < 40 and 0 <= y0 <= y1 < 40
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert xs.min() == x0 and xs.max() == x1 and ys.min() == y0 and ys.max() == y1  # covers, and tight
        assert mask.sum() >= 20  # an object, not a speck
        obj = img[:, mask].float()
        assert obj.std(dim=1).max() < 12  # the mask's pixels are the uniformly coloured object (±3% shading)


def test_shapes_background_is_cluttered():
    g = generate(50, seed=0)
    bg = g.images.float().permute(0, 2, 3, 1)[~g.masks]  # background pixels
    assert bg.std(dim=0).min() > 30  # far from a flat background


def test_label_noise_flips_exact_count_to_other_classes():
    labels = torch.randint(0, 5, (1001,), generator=torch.Generator().manual_seed(0))
    noisy, rec = flip_labels(labels, 5, 0.1, seed=7)
    assert len(rec.indices) == round(0.1 * 1001) == 100
    changed = torch.nonzero(noisy != labels).flatten().tolist()
    assert changed == rec.indices  # exactly the recorded positions changed
    assert rec.original_labels == labels[rec.indices].tolist()
    assert rec.noisy_labels == noisy[rec.indices].tolist()
    assert all(o != n for o, n in zip(rec.original_labels, rec.noisy_labels))
    # every other class is reachable: the flips are spread over K-1 targets
    shifts = (np.array(rec.noisy_labels) - np.array(rec.original_labels)) % 5
    assert set(shifts.tolist()) == {1, 2, 3, 4}
    noisy2, rec2 = flip_labels(labels, 5, 0.1, seed=7)
    assert torch.equal(noisy, noisy2) and rec2 == rec


def test_noise_touches_training_split_only_and_is_recorded():
    cfg = DataConfig(train_size=500, test_size=100, label_noise=0.2, noise_seed=1)
    train, test = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    assert train.noise is not None and len(train.noise.indices) == 100
    assert int((train.labels != train.clean_labels).sum()) == 100
    clean_test = load_dataset(DataConfig(train_size=500, test_size=100), "test")
    assert test.noise is None and torch.equal(test.labels, clean_test.labels)
    assert train.fingerprint() != load_dataset(DataConfig(train_size=500, test_size=100), "train").fingerprint()


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_impossible_noise_rate(rate):
    with pytest.raises(UserError, match="label-noise"):
        load_dataset(DataConfig(train_size=50, test_size=10, label_noise=rate), "train")


@needs_mnist
def test_mnist_through_torchvision():
    train = load_dataset(DataConfig("mnist", data_root=str(MNIST_ROOT)), "train")
    test = load_dataset(DataConfig("mnist", data_root=str(MNIST_ROOT), test_size=100), "test")
    assert len(train) == 60000 and len(test) == 100 and train.image_shape == (1, 28, 28)
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # the published first labels
    x, _ = train.tensors(slice(0, 10000))
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1) < 0.02  # the standard MNIST normalisation
    assert train.classes[0].startswith("0")


def test_missing_torchvision_files_error(tmp_path):
    with pytest.raises(UserError, match=r"not found at .*MNIST.*--download"):
        load_dataset(DataConfig("mnist", data_root=str(tmp_path)), "train")


def _write_png(path, colour, size=(20, 14)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_folder_dataset(tmp_path):
    colours = {"apple": (255, 0, 0), "kiwi & <lime>": (0, 255, 0)}
    for split, count in (("train", 3), ("test", 2)):
        for name, colour in colours.items():
            for i in range(count):
                _write_png(tmp_path / split / name / f"{i}.png", colour)
    cfg = DataConfig(f"folder:{tmp_path}", image_size=16)
    train, test = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    assert train.classes == sorted(colours) and len(train) == 6 and len(test) == 4
    assert train.image_shape == (3, 16, 16)
    for img, label in zip(train.images, train.labels):
        expected = torch.tensor(colours[train.classes[label]], dtype=torch.uint8)
        assert torch.equal(img[:, 8, 8], expected)  # resized solid colour keeps its colour
    x, y = train[0]
    assert torch.allclose(train.denormalize(x)[:, 0, 0] * 255, train.images[0][:, 0, 0].float(), atol=1e-3)


def test_folder_dataset_corrupt_image(tmp_path):
    _write_png(tmp_path / "train" / "a" / "ok.png", (1, 2, 3))
    (tmp_path / "train" / "a" / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(UserError, match=r"cannot read image .*bad\.png"):
        load_dataset(DataConfig(f"folder:{tmp_path}"), "train")


def test_folder_dataset_missing(tmp_path):
    with pytest.raises(UserError, match="PATH/train"):
        load_dataset(DataConfig(f"folder:{tmp_path}"), "train")


def test_unknown_spec():
    with pytest.raises(UserError, match="unknown dataset spec"):
        load_dataset(DataConfig("imagenet"), "train")
