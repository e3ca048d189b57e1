"""Per-example gradients with torch.func against a per-example autograd loop; parameter selection; objective."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainfluence.data import DataConfig, load_dataset
from trainfluence.errors import UserError
from trainfluence.gradients import GradientComputer
from trainfluence.models import build_model
from trainfluence.objective import FunctionalModel, Objective, select_parameters


class ReusedReLU(nn.Module):
    """One ReLU module applied three times, and a functional relu."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.fc1, self.fc2 = nn.Linear(6 * 16, 20), nn.Linear(20, 5)

    def forward(self, x):
        x = self.act(self.c1(x))
        x = F.max_pool2d(self.act(self.c2(x)), 8)
        return self.fc2(F.relu(self.act(self.fc1(x.flatten(1)))))


def loop_gradients(model: nn.Module, names: list[str], x, y) -> torch.Tensor:
    params = dict(model.named_parameters())
    rows = []
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def batch():
    ds = load_dataset(DataConfig(train_size=64, test_size=8), "train")
    return ds.tensors(slice(0, 6))


def _resnet():
    torch.manual_seed(0)
    model = build_model("resnet18", 5, 3, 32)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("make", [lambda: build_model("cnn", 5, 3, 32), _resnet, ReusedReLU], ids=["cnn", "resnet18", "reused_relu"])
def test_vmap_equals_autograd_loop(make, batch):
    torch.manual_seed(1)
    model = make().eval()
    x, y = batch
    fm = FunctionalModel(model, "all")
    computer = GradientComputer(fm, Objective(), memory_budget=64 << 20)
    computer._batch = 4  # two vmap calls over the 6 examples
    got = computer.flat(x, y)
    want = loop_gradients(model, fm.names, x, y)
    rel = (got - want).norm(dim=1) / want.norm(dim=1)
    assert got.shape == (6, fm.dim)
    assert float(rel.max()) < 1e-5
    eg = computer(x, y)
    with torch.no_grad():
        logits = model(x)
    assert torch.allclose(eg.loss, F.cross_entropy(logits, y, reduction="none"), atol=1e-5)
    assert torch.equal(eg.pred, logits.argmax(1))


def test_user_model_untouched(batch):
    model = build_model("cnn", 5, 3, 32).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fm = FunctionalModel(model, "all")
    GradientComputer(fm, Objective()).flat(*batch)
    assert model.training  # still in train mode: we evaluated a private eval-mode copy
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_parameter_selection(batch):
    model = build_model("cnn", 5, 3, 32).eval()
    assert select_parameters(model, "last") == ["classifier.1.weight", "classifier.1.bias"]
    assert select_parameters(model, "features.8,classifier") == ["features.8.weight", "features.8.bias",
                                                                  "classifier.1.weight", "classifier.1.bias"]
    with pytest.raises(UserError, match="no trainable parameters under 'head'"):
        select_parameters(model, "head")
    # the last-layer gradient is the sub-vector of the full gradient
    full = GradientComputer(FunctionalModel(model, "all"), Objective()).flat(*batch)
    last = GradientComputer(FunctionalModel(model, "last"), Objective()).flat(*batch)
    assert torch.allclose(full[:, -last.shape[1]:], last, atol=1e-6)
    # closed form for the last layer: dℓ/dW = (softmax(z) − onehot(y)) hᵀ
    x, y = batch
    with torch.no_grad():
        h = model.pool(model.features(x)).flatten(1)
        r = torch.softmax(model.classifier(h), 1) - F.one_hot(y, 5)
    closed = torch.cat([(r[:, :, None] * h[:, None, :]).flatten(1), r], 1)
    assert torch.allclose(last, closed, atol=1e-5)


def test_flatten_round_trip():
    fm = FunctionalModel(build_model("cnn", 5, 3, 32), "all")
    flat = fm.flat_params()
    assert flat.shape == (fm.dim,)
    back = fm.unflatten(torch.stack([flat, 2 * flat]))
    assert all(torch.equal(back[n][1], 2 * fm.params[n]) for n in fm.names)
    assert torch.equal(fm.flatten(back)[0], flat)


def test_objective_regularizer():
    obj = Objective(weight_decay=0.1)
    params = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([[1.0]])}
    assert float(obj.regularizer(params)) == pytest.approx(0.05 * 26)
