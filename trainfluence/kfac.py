"""Kronecker-factored curvature: K-FAC (Martens & Grosse 2015; KFC for convolutions, Grosse & Martens 2016) and
its eigenvalue correction EK-FAC (George et al. 2018), approximating the Gauss–Newton matrix of the objective.

For a Linear or Conv2d layer with weight W [out, in] (a convolution's weight as [out, C·kh·kw]; a selected bias is
one more input column fed by a constant 1), the per-example gradient is Gᵢ = Σₜ δₜ aₜᵀ: aₜ the layer's input at
position t (unfolded patches for a convolution), δₜ the gradient at its output.  With the model's own labels —
the Fisher, which for cross-entropy is the GGN; the expectation over labels is taken exactly, one backward pass per
class with output cotangent u_c, Σ_c u_c u_cᵀ = H_f (:meth:`~trainfluence.objective.Objective.output_hessian_factors`):

    G_layer ≈ T · S ⊗ A,   A = mean_{i,t} aₜaₜᵀ,   S = mean_{i,t} E_y[δₜδₜᵀ]        (K-FAC; T positions per example)

With S = Q_S Λ_S Q_Sᵀ and A = Q_A Λ_A Q_Aᵀ, K-FAC's eigenvalues in the basis Q_S ⊗ Q_A are T·λ_S,o λ_A,j; EK-FAC
replaces them by the second moment of the gradients in that basis (which keeps the cross-position terms K-FAC
drops and fixes the Kronecker approximation's error on the diagonal):

    Λ*[o, j] = (1/n) Σᵢ E_y[(Q_Sᵀ Gᵢ Q_A)²[o, j]].

Parameters of other modules (BatchNorm, …) get the diagonal (1/n) Σᵢ E_y[gᵢ²].  With d = wd + λ, the
approximation P = blockdiag(…) + dI is inverted exactly:

    P⁻¹v = Q_S [(Q_Sᵀ V Q_A) / (Λ + d)] Q_Aᵀ per layer,    v / (diagonal + d) elsewhere;

and gᵀP⁻¹g = ‖(Q_Sᵀ G Q_A) / √(Λ + d)‖² + … (:meth:`KroneckerCurvature.whiten`).  Factors are estimated in
float64 (products of a batch in the model's dtype, their sums in float64) over the given examples,
``batch_size`` at a time: one pass for A and S, a second for Λ* (EK-FAC); the K output cotangents of a batch go
through one batched backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from .checks import FIX_MODEL, require_finite
from .data.source import ExampleSource
from .objective import FunctionalModel, Objective
from .progress import bar


@dataclass(frozen=True)
class KroneckerModule:
    """A Linear or Conv2d layer whose selected weight (and bias, if selected) has a Kronecker-factored gradient
    Σₜ δₜ aₜᵀ — what K-FAC/EK-FAC and the factored projection both work on."""

    module: str
    weight: str
    bias: str | None  # None when the bias is absent or not selected
    conv: dict | None  # unfold arguments for a convolution; None for a linear layer


def kronecker_modules(fm: FunctionalModel) -> list[KroneckerModule]:
    """The Linear and Conv2d layers (plain zero-padded convolutions, one group) among the selected parameters."""
    chosen, out = set(fm.names), []
    for name, module in fm.module.named_modules():
        weight, bias = (f"{name}.weight", f"{name}.bias") if name else ("weight", "bias")
        if weight not in chosen:
            continue
        if isinstance(module, nn.Linear):
            conv = None
        elif isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros" \
                and not isinstance(module.padding, str):
            conv = {"kernel_size": module.kernel_size, "dilation": module.dilation, "padding": module.padding,
                    "stride": module.stride}
        else:
            continue
        out.append(KroneckerModule(name, weight, bias if bias in chosen else None, conv))
    return out


def _gram(x: torch.Tensor) -> torch.Tensor:
    """Σ_b x_b x_bᵀ for x [B, d, T] in x's dtype.  Per-example products summed when they are no larger than x
    itself (d ≤ T: shorter float32 accumulations, and no transposed copy of x); else one matmul over the
    [d, B·T] copy, so memory never exceeds twice x's size (a 512-channel 3×3 layer would need [B, 4608, 4608])."""
    if x.shape[1] <= x.shape[2]:
        return torch.bmm(x, x.transpose(1, 2)).sum(0)
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    return flat @ flat.T


@dataclass
class _Layer:
    module: str
    weight: str
    bias: str | None
    conv: dict | None  # unfold arguments for a convolution; None for a linear layer
    A: torch.Tensor | None = None
    S: torch.Tensor | None = None
    positions: float = 1.0  # mean positions per example (T)
    QA: torch.Tensor | None = None
    QS: torch.Tensor | None = None
    eig: torch.Tensor | None = None  # [out, in] eigenvalues in the basis Q_S ⊗ Q_A (K-FAC's or EK-FAC's)
    kfac_eig: torch.Tensor | None = None  # K-FAC's own, T·λ_S,o λ_A,j (kept when EK-FAC replaces them)

    def linear_inputs(self, inp: torch.Tensor) -> torch.Tensor:
        """A linear layer's input → [B, T, in] (+ a column of ones for the bias); convolutions never unfold this
        way (:meth:`factor_sums`, :meth:`rotated_squares`)."""
        a = inp.reshape(inp.shape[0], -1, inp.shape[-1])
        if self.bias is not None:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        return a

    @staticmethod
    def linear_deltas(out_grad: torch.Tensor) -> torch.Tensor:
        """A linear layer's output gradients, one set per output cotangent: [K, B, …, out] → [K, B, T, out]."""
        return out_grad.reshape(out_grad.shape[0], out_grad.shape[1], -1, out_grad.shape[-1])

    def factor_sums(self, inp: torch.Tensor, out_grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Σ aₜaₜᵀ [in, in] and Σ δₜδₜᵀ [out, out] over the batch's examples, positions (and, for δ, the K output
        cotangents), and the number of positions summed.  A convolution's bias row and column of A are the patches'
        sums and the count (no concatenated column of ones); see :func:`_gram` for the products."""
        if self.conv is None:
            a, d = self.linear_inputs(inp), _Layer.linear_deltas(out_grad)
            a2, d2 = a.reshape(-1, a.shape[-1]), d.reshape(-1, d.shape[-1])
            return a2.T @ a2, d2.T @ d2, a.shape[0] * a.shape[1]
        patches = F.unfold(inp, **self.conv)  # [B, C·kh·kw, T]
        A, S = _gram(patches), _gram(out_grad.flatten(3).flatten(0, 1))  # δ: [K·B, out, T]
        positions = patches.shape[0] * patches.shape[2]
        if self.bias is not None:
            col = patches.sum((0, 2))
            A = torch.cat([torch.cat([A, col[:, None]], 1),
                           torch.cat([col, col.new_tensor([float(positions)])])[None, :]], 0)
        return A, S, positions

    def rotated_squares(self, inp: torch.Tensor, out_grad: torch.Tensor, QA: torch.Tensor,
                        QS: torch.Tensor) -> torch.Tensor:
        """Σ over the K output cotangents and the B examples of (Q_Sᵀ Gᵢ Q_A)² [out, in], from the layer's input
        and its output gradients [K, B, …] (the EK-FAC correction's sum for one batch); ``QA``, ``QS``: this
        layer's eigenbases on the input's device and in its dtype (converted once per pass, not per batch).

        A convolution never forms its unfolded patches: Q_Aᵀ aₜ for every position is one conv2d with Q_A's
        columns as kernels (and the bias column's row as the convolution's bias), [B, in, T]; then, one cotangent
        at a time, Σₜ δₜ (Q_Aᵀ aₜ)ᵀ is a batched matmul [B, out, T]·[B, T, in] on δ as the backward pass gives it,
        and Q_Sᵀ is applied to that small product — no [K, B, T, ·] copies."""
        if self.conv is None:
            a = self.linear_inputs(inp) @ QA  # [B, T, in]
            d = _Layer.linear_deltas(out_grad) @ QS  # [K, B, T, out]
            if a.shape[1] == 1:  # one position: (Q_Sᵀ δ aᵀ Q_A)² = (Q_Sᵀδ)² ((Q_Aᵀa)²)ᵀ, no [B, out, in] tensor
                return torch.einsum("kbo,bj->oj", d[:, :, 0].pow(2), a[:, 0].pow(2))
            return torch.einsum("kbto,btj->kboj", d, a).pow(2).sum((0, 1))
        c = self.conv
        weights = QA[: QA.shape[0] - int(self.bias is not None)].T  # [in, C·kh·kw]: row j = eigenvector j
        a = F.conv2d(inp, weights.reshape(len(weights), inp.shape[1], *c["kernel_size"]),
                     bias=QA[-1] if self.bias is not None else None, stride=c["stride"], padding=c["padding"],
                     dilation=c["dilation"]).flatten(2).transpose(1, 2)  # [B, T, in]
        total = torch.zeros(QS.shape[1], QA.shape[1], dtype=inp.dtype, device=inp.device)
        for d in out_grad.flatten(3):  # [B, out, T] per cotangent
            total += (QS.T @ torch.bmm(d, a)).pow(2).sum(0)
        return total


@dataclass
class KroneckerCurvature:
    """Block-diagonal GGN approximation over ``fm``'s selected parameters; ``corrected``: EK-FAC, else K-FAC."""

    fm: FunctionalModel
    objective: Objective
    corrected: bool = True
    layers: list[_Layer] = field(default_factory=list)
    diagonal: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter name → its diagonal estimate
    examples: int = 0

    def __post_init__(self) -> None:
        self.layers = [_Layer(m.module, m.weight, m.bias, m.conv) for m in kronecker_modules(self.fm)]
        covered = {n for layer in self.layers for n in (layer.weight, layer.bias) if n}
        self.diagonal = {n: torch.zeros(self.fm.params[n].shape, dtype=torch.float64) for n in self.fm.names if n not in covered}

    # ---- estimation ----------------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor):
        """Logits, each layer's input and (graph-connected) output for batch x."""
        inputs: dict[str, torch.Tensor] = {}
        outputs: dict[str, torch.Tensor] = {}
        modules = dict(self.fm.module.named_modules())

        def hook_for(name: str):
            def hook(_m, inp, out):
                inputs[name] = inp[0].detach()
                outputs[name] = out
                return out.clone()  # what follows (an in-place ReLU) must not change the recorded output
            return hook

        handles = [modules[layer.module].register_forward_hook(hook_for(layer.module)) for layer in self.layers]
        params = {n: p.detach().requires_grad_(True) for n, p in self.fm.params.items()}
        try:
            with torch.enable_grad():
                logits = self.objective.outputs(lambda inp: self.fm(params, inp), x)
        finally:
            for h in handles:
                h.remove()
        return logits, inputs, outputs

    def _output_grads(self, logits: torch.Tensor, outputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Every layer's output gradient for every output cotangent u_c (Σ_c u_c u_cᵀ = H_f) at once, [K, B, …]
        per layer — one batched backward pass over the K cotangents."""
        factors = self.objective.output_hessian_factors(logits.detach()).to(logits.dtype)  # [K, B, K]
        targets = [outputs[layer.module] for layer in self.layers]
        return list(torch.autograd.grad(logits, targets, grad_outputs=factors, is_grads_batched=True))

    def _diagonal_pass(self, x: torch.Tensor, logits: torch.Tensor) -> None:
        """Σᵢ E_y[gᵢ²] for the parameters outside Kronecker blocks (per-example gradients of the pseudo-losses)."""
        names = list(self.diagonal)
        if not names:
            return
        factors = self.objective.output_hessian_factors(logits.detach())
        fixed = {n: p for n, p in self.fm.params.items() if n not in self.diagonal}

        def pseudo(own: dict[str, torch.Tensor], xi: torch.Tensor, ui: torch.Tensor) -> torch.Tensor:
            out = self.objective.outputs(lambda inp: self.fm({**fixed, **own}, inp), xi.unsqueeze(0))
            return (out.squeeze(0) * ui).sum()

        own = {n: self.fm.params[n] for n in names}
        for c in range(len(factors)):
            per_example = vmap(grad(pseudo), in_dims=(None, 0, 0))(own, x, factors[c].to(x.dtype))
            for n in names:
                self.diagonal[n] += per_example[n].double().pow(2).sum(0).cpu()

    def fit(self, source: ExampleSource, indices: np.ndarray, *, batch_size: int = 128, progress: bool = True) -> "KroneckerCurvature":
        """Estimate the factors (and, EK-FAC, the corrected eigenvalues) from the examples ``indices``."""
        device = self.fm.device
        batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
        totals = {layer.module: [0.0, 0.0] for layer in self.layers}  # positions, examples
        for sel in bar(batches, desc="kronecker factors", unit="batch", disable=not progress):
            x, _ = source.tensors(sel)
            x = x.to(device)
            logits, inputs, outputs = self._forward(x)
            grads = self._output_grads(logits, outputs) if self.layers else []
            for layer, g in zip(self.layers, grads):
                A, S, positions = layer.factor_sums(inputs[layer.module], g)
                # products in the model's dtype, sums of batches in float64
                layer.A = (layer.A if layer.A is not None else 0) + A.double()
                layer.S = (layer.S if layer.S is not None else 0) + S.double()
                totals[layer.module][0] += positions
                totals[layer.module][1] += len(x)
            self._diagonal_pass(x, logits)
        self.examples = len(indices)
        for layer in self.layers:
            positions, examples = totals[layer.module]
            layer.positions = positions / examples
            layer.A, layer.S = (layer.A / positions).cpu(), (layer.S / positions).cpu()
            require_finite(layer.A, f"the K-FAC input factor of {layer.module}", FIX_MODEL)
            require_finite(layer.S, f"the K-FAC output factor of {layer.module}", FIX_MODEL)
            la, layer.QA = torch.linalg.eigh(layer.A)
            ls, layer.QS = torch.linalg.eigh(layer.S)
            layer.eig = layer.kfac_eig = layer.positions * ls.clamp_min(0)[:, None] * la.clamp_min(0)[None, :]
        for n in self.diagonal:
            self.diagonal[n] = self.diagonal[n] / max(1, self.examples)
        if self.corrected and self.layers:
            self._correct(source, batches, progress)
        return self

    def uncorrected(self) -> "KroneckerCurvature":
        """K-FAC from the same factors (what ``fit`` with ``corrected=False`` on the same examples gives), without
        another pass over the data: EK-FAC keeps K-FAC's eigenvalues beside its own."""
        if not self.corrected:
            return self
        plain = KroneckerCurvature(self.fm, self.objective, corrected=False)
        plain.layers = [replace(layer, eig=layer.kfac_eig) for layer in self.layers]
        plain.diagonal, plain.examples = self.diagonal, self.examples
        return plain

    def _correct(self, source: ExampleSource, batches: list[np.ndarray], progress: bool) -> None:
        """EK-FAC: the eigenvalues re-estimated as E[(Q_Sᵀ Gᵢ Q_A)²] in the K-FAC eigenbasis."""
        sums = {layer.module: torch.zeros_like(layer.eig) for layer in self.layers}
        # in each layer's dtype (its products run in it; the sums in float64), converted once for the whole pass
        bases = [tuple(Q.to(self.fm.device, self.fm.params[layer.weight].dtype) for Q in (layer.QA, layer.QS))
                 for layer in self.layers]
        for sel in bar(batches, desc="ek-fac eigenvalues", unit="batch", disable=not progress):
            x, _ = source.tensors(sel)
            logits, inputs, outputs = self._forward(x.to(self.fm.device))
            for layer, g, (QA, QS) in zip(self.layers, self._output_grads(logits, outputs), bases):
                sums[layer.module] += layer.rotated_squares(inputs[layer.module], g, QA, QS).double().cpu()
        for layer in self.layers:
            layer.eig = sums[layer.module] / self.examples
            require_finite(layer.eig, f"the EK-FAC eigenvalues of {layer.module}", FIX_MODEL)

    # ---- using the approximation ---------------------------------------------------------------------------
    def _blocks(self, V: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.fm.unflatten(V.double())

    def _matrix(self, layer: _Layer, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        W = parts[layer.weight].reshape(*parts[layer.weight].shape[:1], parts[layer.weight].shape[1], -1)
        if layer.bias is not None:
            W = torch.cat([W, parts[layer.bias].unsqueeze(-1)], dim=-1)
        return W

    def _apply(self, V: torch.Tensor, damping: float, power: float, rotate_back: bool) -> list[torch.Tensor]:
        parts = self._blocks(V)
        out = []
        for layer in self.layers:
            QS, QA = layer.QS.to(V.device), layer.QA.to(V.device)
            Z = QS.T @ self._matrix(layer, parts) @ QA
            Z = Z / (layer.eig.to(V.device) + damping) ** power
            if not rotate_back:
                out.append(Z.flatten(1))
                continue
            W = QS @ Z @ QA.T
            if layer.bias is not None:
                parts[layer.bias], W = W[..., -1], W[..., :-1]
            parts[layer.weight] = W.reshape(parts[layer.weight].shape)
        for n, d in self.diagonal.items():
            scaled = parts[n] / (d.to(V.device) + damping) ** power
            if rotate_back:
                parts[n] = scaled
            else:
                out.append(scaled.flatten(1))
        return [self.fm.flatten(parts)] if rotate_back else out

    def solve(self, V: torch.Tensor, damping: float) -> torch.Tensor:
        """P⁻¹V for flat vectors V [m, p] (``damping`` = wd + λ, added to every eigenvalue)."""
        return self._apply(V, damping, 1.0, True)[0].to(V.dtype)

    def inverse_sqrt(self, V: torch.Tensor, damping: float) -> torch.Tensor:
        """P^{-1/2}V, the symmetric square root (for spectra of P^{-1/2} H P^{-1/2})."""
        return self._apply(V, damping, 0.5, True)[0].to(V.dtype)

    def whiten(self, G: torch.Tensor, damping: float) -> torch.Tensor:
        """Rows w with ‖w‖² = gᵀP⁻¹g (float64)."""
        return torch.cat(self._apply(G, damping, 0.5, False), dim=1)

    def eigenvalues(self) -> torch.Tensor:
        """Every eigenvalue of the undamped approximation (float64, CPU)."""
        return torch.cat([layer.eig.flatten() for layer in self.layers] + [d.flatten() for d in self.diagonal.values()])
