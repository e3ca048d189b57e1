"""The training objective, and the model seen as a pure function of its selected parameters.

Objective (model in eval mode, over the selected parameters θ):

    L(θ) = (1/n) Σᵢ ℓ(zᵢ, θ) + (wd/2) ‖θ‖²

An :class:`Objective` says how a batch becomes model outputs (:meth:`Objective.outputs`), how outputs and
targets become one loss per example (:meth:`Objective.loss`, cross-entropy by default), and how the loss curves
in output space (:meth:`Objective.output_hessian_vp`) — the piece the Gauss–Newton matrix G = Jᵀ H_f J needs.  ``weight_decay`` is ``wd`` — read from the checkpoint unless given.

A :class:`FunctionalModel` is a private eval-mode copy of the user's model, called with
``torch.func.functional_call`` so the selected parameters can be differentiated functionally; the user's model
object is never modified.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .errors import UserError
from .linalg import symmetric_eigh

Params = dict[str, torch.Tensor]


@dataclass
class Objective:
    """Cross-entropy classification objective with L2 coefficient ``weight_decay`` (wd)."""

    weight_decay: float = 0.0
    name: str = "cross_entropy"

    def outputs(self, forward: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        """Batch → model outputs (logits)."""
        return forward(inputs)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Outputs and targets → per-example loss ℓ, shape [B]."""
        return F.cross_entropy(outputs, targets, reduction="none")

    def output_hessian_vp(self, outputs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """H_f u per example, H_f = ∂²ℓ/∂f² at the outputs f.  Cross-entropy: H_f = diag(p) − ppᵀ, p = softmax(f)
        (independent of the label, positive semi-definite)."""
        p = torch.softmax(outputs, dim=-1)
        return p * u - p * (p * u).sum(-1, keepdim=True)

    def output_hessian_factors(self, outputs: torch.Tensor) -> torch.Tensor:
        """[K − 1, B, K]: vectors u_c with Σ_c u_c u_cᵀ = H_f per example, so that E_{y∼p}[∇ℓ_y ∇ℓ_yᵀ] = Jᵀ H_f J
        (the Fisher with the model's own labels equals the GGN) is a sum over backward passes with cotangents u_c.

        Cross-entropy: H_f = diag(p) − ppᵀ has rank at most K − 1 (H_f 1 = 0), so its eigendecomposition
        H_f = Σ_c λ_c v_c v_cᵀ without the null direction gives K − 1 vectors u_c = √λ_c v_c, one backward pass fewer
        than the K-term identity Σ_c p_c (e_c − p)(e_c − p)ᵀ.  Computed in float64 (a [K, K] eigh per example),
        returned in ``outputs``' dtype, largest eigenvalue first."""
        p = torch.softmax(outputs.double(), dim=-1)
        hf = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        lam, vec = symmetric_eigh(hf)  # ascending; the first is H_f's null direction (λ = 0 up to rounding)
        factors = vec[..., 1:].flip(-1) * lam[..., 1:].flip(-1).clamp_min(0).sqrt().unsqueeze(-2)  # [B, K, K − 1]
        return factors.permute(2, 0, 1).to(outputs.dtype)

    def sampled_output_factors(self, outputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """[1, B, K]: one vector u = p − e_y per example with y drawn from the model's own prediction p (on the CPU,
        from ``generator``), so that E_y[uuᵀ] = diag(p) − ppᵀ = H_f: the Fisher estimated by Monte Carlo with one
        backward pass, where :meth:`output_hessian_factors` takes K − 1 to give its expectation exactly."""
        p = torch.softmax(outputs.detach().double(), dim=-1)
        y = torch.multinomial(p.cpu(), 1, generator=generator)[:, 0].to(p.device)
        return (p - torch.nn.functional.one_hot(y, p.shape[-1]).double()).unsqueeze(0).to(outputs.dtype)

    def regularizer(self, params: Params) -> torch.Tensor:
        """(wd/2) ‖θ‖² over the selected parameters."""
        return 0.5 * self.weight_decay * sum((p * p).sum() for p in params.values())


def select_parameters(model: nn.Module, selection: str | Sequence[str] = "all") -> list[str]:
    """Names of the trainable parameters to differentiate.

    ``"all"``: every trainable parameter; ``"last"``: those of the last module (in registration order) that owns
    parameters (the classifier layer); otherwise module or parameter names (a list, or a comma-separated string),
    each selecting the parameters it names or that lie under it.
    """
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise UserError("the model has no trainable parameters")
    if selection == "all":
        return trainable
    if selection == "last":
        owners = [name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
        last = owners[-1]
        return [n for n in trainable if n.rpartition(".")[0] == last]
    wanted = [s.strip() for s in selection.split(",")] if isinstance(selection, str) else list(selection)
    chosen: list[str] = []
    for w in wanted:
        hits = [n for n in trainable if n == w or n.startswith(w + ".")]
        if not hits:
            modules = sorted({n.rpartition(".")[0] for n in trainable})
            raise UserError(f"no trainable parameters under {w!r}: use all, last, or module names such as {', '.join(modules[:8])}")
        chosen += [h for h in hits if h not in chosen]
    return [n for n in trainable if n in chosen]  # model order


class FunctionalModel:
    """An eval-mode private copy of ``model``; ``fm(params, x)`` runs it with the selected parameters replaced.

    ``fm.params`` holds the checkpoint values θ̂ of the selected parameters (detached); everything else (other
    parameters, BatchNorm statistics) is fixed.  Flat vectors follow the order of ``fm.names``.
    """

    def __init__(self, model: nn.Module, selection: str | Sequence[str] = "all", device: torch.device | str | None = None):
        self.module = copy.deepcopy(model).eval()
        if device is not None:
            self.module.to(device)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.names = select_parameters(model, selection)
        state = dict(self.module.named_parameters()) | dict(self.module.named_buffers())
        self.params: Params = {n: state[n].detach() for n in self.names}
        self.fixed: Params = {n: t.detach() for n, t in state.items() if n not in self.params}
        self.shapes = [tuple(self.params[n].shape) for n in self.names]
        self.sizes = [self.params[n].numel() for n in self.names]
        self.dim = sum(self.sizes)

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    def __call__(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point() and x.dtype != self.dtype:
            x = x.to(self.dtype)  # e.g. float32 images into a float64 model
        return functional_call(self.module, {**self.fixed, **params}, (x,), strict=False)

    def flatten(self, params: Params) -> torch.Tensor:
        """Dict of tensors with optional leading batch dims → flat [..., p] in ``names`` order."""
        first = params[self.names[0]]
        lead = first.shape[: first.dim() - len(self.shapes[0])]
        return torch.cat([params[n].reshape(*lead, -1) for n in self.names], dim=-1)

    def unflatten(self, flat: torch.Tensor) -> Params:
        """Flat [..., p] → dict of tensors shaped like the parameters (leading dims kept)."""
        lead = flat.shape[:-1]
        pieces = torch.split(flat, self.sizes, dim=-1)
        return {n: piece.reshape(*lead, *shape) for n, piece, shape in zip(self.names, pieces, self.shapes)}

    def flat_params(self) -> torch.Tensor:
        return self.flatten(self.params)
