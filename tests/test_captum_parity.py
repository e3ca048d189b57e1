"""Saliency parity with Captum (a test-only dependency) on real torchvision models and on the layer patterns that
break naive hooks: a conv followed by ``ReLU(inplace=True)`` (torchvision's VGG and ResNet), BatchNorm with
non-trivial running statistics, one in-place ReLU module reused across layers, and in-place functional ops in
``forward`` (``x.relu_()``, ``y += x``).  Every model is built offline with fixed seeds, in eval mode; the bar is a
per-image Pearson correlation ≥ 0.999 with Captum for every method whose definition Captum shares.

Not compared: Captum's ``LayerConductance`` and ``LayerIntegratedGradients`` integrate along a path in the
layer's space (Σₖ ∂F/∂z · Δz), while our internal influence is the path-DoI mean gradient χ (Leino et al.) that
Captum calls ``InternalInfluence`` — the definitions differ, so only the latter is compared.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainfluence.errors import UserError
from trainfluence.internal import distributional_influence, path_doi
from trainfluence.saliency import attribute, attribute_full
from trainfluence.saliency.targets import ClassTarget, capture

captum_attr = pytest.importorskip("captum.attr", reason="Captum is a test extra: pip install -e '.[test]'")
torchvision = pytest.importorskip("torchvision")

PEARSON = 0.999


def vgg11() -> nn.Module:
    """torchvision's VGG-11 (conv → ReLU(inplace=True) throughout); the classifier shrunk so the test is quick —
    the layers under test are torchvision's own ``features``."""
    torch.manual_seed(0)
    model = torchvision.models.vgg11(weights=None, num_classes=10)
    model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 64), nn.ReLU(inplace=True), nn.Linear(64, 10))
    return model.eval()


def resnet18() -> nn.Module:
    """torchvision's ResNet-18 with random BatchNorm running statistics (so BatchNorm is not the identity)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.weight.data.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model.eval()


class SharedReLU(nn.Module):
    """One ``ReLU(inplace=True)`` module used after both BatchNorms."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 5)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class FunctionalInplace(nn.Module):
    """In-place functional ops on layer outputs inside ``forward``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        a = self.conv1(x)
        a.relu_()
        b = self.conv2(a)
        b += a
        return self.fc(F.adaptive_max_pool2d(F.relu(b), 1).flatten(1))


# model, input size, layers for Grad-CAM / internal influence
CASES = {
    "vgg11": (vgg11, 64, ["features.3", "features.8", "features.18"]),
    "resnet18": (resnet18, 32, ["layer1.0.conv1", "layer1.0.bn1", "layer4"]),
    "shared_relu_bn": (SharedReLU, 16, ["conv1", "bn1", "bn2"]),
    "functional_inplace": (FunctionalInplace, 16, ["conv1", "conv2"]),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    make, size, layers = CASES[request.param]
    model = make().eval()  # Captum runs the model as it is; ours switches to eval mode itself
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        k = model(x).shape[1]
    target = torch.tensor([1, 3, 7]) % k
    return {"name": request.param, "model": model, "x": x, "target": target, "layers": layers}


def pearson_per_image(ours: torch.Tensor, theirs: torch.Tensor) -> list[float]:
    out = []
    for a, b in zip(ours.detach().reshape(len(ours), -1).double(), theirs.detach().reshape(len(theirs), -1).double()):
        if torch.allclose(a, b, atol=1e-7):  # equal (e.g. both all zero): perfect agreement
            out.append(1.0)
        else:
            out.append(float(np.corrcoef(a.numpy(), b.numpy())[0, 1]))
    return out


def agree(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    r = pearson_per_image(ours, theirs)
    assert min(r) >= PEARSON, (what, r)


def test_gradient_grad_x_input_guided_backprop(case):
    m, x, t = case["model"], case["x"], case["target"]
    agree(attribute(m, x, "gradient", t), captum_attr.Saliency(m).attribute(x, target=t, abs=False), "gradient")
    agree(attribute(m, x, "grad_x_input", target=t), captum_attr.InputXGradient(m).attribute(x, target=t), "grad×input")
    if case["name"] != "functional_inplace":  # Captum's guided backprop hooks nn.ReLU modules; ours intercepts relu_ too
        agree(attribute(m, x, "guided_backprop", t), captum_attr.GuidedBackprop(m).attribute(x, target=t), "guided")


def test_integrated_gradients_and_smoothgrad(case):
    m, x, t = case["model"], case["x"], case["target"]
    ours, delta = attribute(m, x, "integrated_gradients", t, baselines=torch.zeros_like(x), n_steps=24, tolerance=None,
                            return_convergence_delta=True)
    theirs, their_delta = captum_attr.IntegratedGradients(m).attribute(x, baselines=torch.zeros_like(x), target=t, n_steps=24,
                                                                       method="riemann_middle", return_convergence_delta=True)
    agree(ours, theirs, "integrated gradients")
    assert torch.allclose(delta, their_delta.to(delta), atol=1e-4 * float(theirs.abs().sum() / len(x)))
    # SmoothGrad with the same noise: Captum's Saliency averaged over the copies our tunnel draws (seeded)
    g = torch.Generator().manual_seed(0)
    copies = [x + 0.3 * torch.randn(x.shape, generator=g) for _ in range(6)]
    theirs = torch.stack([captum_attr.Saliency(m).attribute(c, target=t, abs=False) for c in copies]).mean(0)
    agree(attribute(m, x, "smoothgrad", t, nt_samples=6, stdevs=0.3, seed=0), theirs, "smoothgrad")


def test_grad_cam_on_layers_followed_by_in_place_ops(case):
    m, x, t = case["model"], case["x"], case["target"]
    for layer in case["layers"]:
        module = dict(m.named_modules())[layer]
        for relu in (False, True):
            ours = attribute_full(m, x, "grad_cam", t, layer=module, relu_attributions=relu)
            cam = captum_attr.LayerGradCam(m, module).attribute(x, target=t, relu_attributions=relu)
            agree(ours.info["cam"], cam, f"grad-cam at {layer} (layer resolution)")
            up = captum_attr.LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), "bilinear")
            agree(ours.attr[:, :1], up, f"grad-cam at {layer} (upsampled)")


def test_internal_influence_on_layers_followed_by_in_place_ops(case):
    m, x, t = case["model"], case["x"], case["target"]
    for layer in case["layers"]:
        module = dict(m.named_modules())[layer]
        theirs = captum_attr.InternalInfluence(m, module).attribute(x, baselines=0.0, target=t, n_steps=16,
                                                                    method="riemann_middle")
        ours = torch.stack([distributional_influence(m, layer, path_doi(x[i], torch.zeros_like(x[i]), steps=16),
                                                     ClassTarget(int(t[i]))) for i in range(len(x))])
        agree(ours, theirs, f"internal influence at {layer}")


def test_occlusion_with_captum_spellings(case):
    m, x, t = case["model"], case["x"], case["target"]
    size = x.shape[-1]
    window, stride = (16, 8) if size >= 64 else (8, 4) if size >= 32 else (4, 4)
    theirs = captum_attr.Occlusion(m).attribute(x, sliding_window_shapes=(3, window, window),
                                                strides=(3, stride, stride), baselines=0, target=t)
    ours = attribute(m, x, "occlusion", t, sliding_window_shapes=(3, window, window), strides=(3, stride, stride),
                     baselines=0)
    agree(ours, theirs, "occlusion")


def test_capture_records_the_layer_output_not_what_follows():
    model = SharedReLU()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = model.bn1(model.conv1(x))
        with capture(model, "bn1") as store:
            model(x)
    assert torch.equal(store["out"], want) and bool((want < 0).any())  # pre-ReLU values survived the in-place ReLU
    with pytest.raises(UserError, match="runs more than once in one forward pass"):
        attribute(model, x, "grad_cam", 1, layer="act")
    with pytest.raises(UserError, match="grad_cam has no setting 'n_stepz': it accepts layer, relu"):
        attribute(model, x, "grad_cam", 1, n_stepz=3)
    with pytest.raises(UserError, match=r"or Captum's baselines, n_steps"):
        attribute(model, x, "integrated_gradients", 1, baseline_=0)
    with pytest.raises(UserError, match="not a module of this model"):
        attribute(model, x, "grad_cam", 1, layer=nn.Conv2d(3, 3, 1))
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
