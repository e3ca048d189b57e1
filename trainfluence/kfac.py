"""Kronecker-factored curvature: K-FAC (Martens & Grosse 2015; KFC for convolutions, Grosse & Martens 2016) and
its eigenvalue correction EK-FAC (George et al. 2018), approximating the Gauss–Newton matrix of the objective.

For a Linear or Conv2d layer with weight W [out, in] (a convolution's weight as [out, C·kh·kw]; a selected bias is
one more input column fed by a constant 1), the per-example gradient is Gᵢ = Σₜ δₜ aₜᵀ: aₜ the layer's input at
position t (unfolded patches for a convolution), δₜ the gradient at its output.  With the model's own labels —
the Fisher, which for cross-entropy is the GGN; the expectation over labels is taken exactly, one backward pass per
output cotangent u_c with Σ_c u_c u_cᵀ = H_f (K − 1 of them for K classes,
:meth:`~trainfluence.objective.Objective.output_hessian_factors`; the engine's default keeps the leading ones that
hold all but 1% of each batch's trace, :func:`leading_factors`):

    G_layer ≈ T · S ⊗ A,   A = mean_{i,t} aₜaₜᵀ,   S = mean_{i,t} E_y[δₜδₜᵀ]        (K-FAC; T positions per example)

With S = Q_S Λ_S Q_Sᵀ and A = Q_A Λ_A Q_Aᵀ, K-FAC's eigenvalues in the basis Q_S ⊗ Q_A are T·λ_S,o λ_A,j; EK-FAC
replaces them by the second moment of the gradients in that basis (which keeps the cross-position terms K-FAC
drops and fixes the Kronecker approximation's error on the diagonal):

    Λ*[o, j] = (1/n) Σᵢ E_y[(Q_Sᵀ Gᵢ Q_A)²[o, j]].

Parameters of other modules (BatchNorm, …) get the diagonal (1/n) Σᵢ E_y[gᵢ²] (an eval-mode BatchNorm's from the
same backward passes, :func:`norm_gradients`).  With d = wd + λ, the
approximation P = blockdiag(…) + dI is inverted exactly:

    P⁻¹v = Q_S [(Q_Sᵀ V Q_A) / (Λ + d)] Q_Aᵀ per layer,    v / (diagonal + d) elsewhere;

and gᵀP⁻¹g = ‖(Q_Sᵀ G Q_A) / √(Λ + d)‖² + … (:meth:`KroneckerCurvature.whiten`).  Factors are estimated in
float64 (products of a batch in the model's dtype, their sums in float64) over the given examples,
``batch_size`` at a time: one pass for A and S, a second for Λ* (EK-FAC).  Each batch is one forward pass and one
backward pass per output cotangent, each folded into the sums before the next (:meth:`KroneckerCurvature._passes`).
On the CPU the passes run channels-last (see :func:`channels_last_params`).
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
from .gradients import DEFAULT_MEMORY_BUDGET, activation_numel
from .layout import channels_last_copies, wants_channels_last
from .linalg import symmetric_eigh
from .objective import FunctionalModel, Objective
from .progress import bar, note


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


def hooked_norms(fm: FunctionalModel) -> dict[str, tuple[str, str]]:
    """BatchNorm2d modules whose selected γ and β get per-example gradients from hooks: affine, with running
    statistics (so eval mode normalises each example on its own).  module → (γ name, β name)."""
    chosen, out = set(fm.names), {}
    for name, module in fm.module.named_modules():
        if isinstance(module, nn.BatchNorm2d) and module.affine and module.running_mean is not None:
            weight, bias = f"{name}.weight", f"{name}.bias"
            if weight in chosen and bias in chosen:
                out[name] = (weight, bias)
    return out


def norm_gradients(bn: nn.BatchNorm2d, inp: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example gradients [B, C] of an eval-mode BatchNorm2d's γ and β, from its input x and the gradient δ at
    its output: y = γ·x̂ + β with x̂ = (x − μ)/√(σ² + ε) (running statistics), so ∂ℓ/∂γ = Σₜ δₜ x̂ₜ =
    (Σₜ δₜ xₜ − μ Σₜ δₜ) / √(σ² + ε) per channel (no x̂ formed) and ∂ℓ/∂β = Σₜ δₜ."""
    d_sum = delta.sum((2, 3))
    d_x = torch.einsum("bchw,bchw->bc", delta, inp)
    return (d_x - bn.running_mean * d_sum) * (bn.running_var + bn.eps).rsqrt(), d_sum


def channels_last_params(fm: FunctionalModel, has_conv: bool) -> dict[str, torch.Tensor]:
    """Channels-last copies of ``fm``'s 4-D parameters for a hooked pass (the factored projection, the K-FAC and
    EK-FAC fits), as :func:`~trainfluence.layout.wants_channels_last` decides; ``fm`` and the user's model are
    untouched.

    The passes also make each hooked convolution's output channels-last: a 1-channel input (MNIST) makes the first
    convolution return the default layout, and the elementwise backward that follows then gets mixed layouts —
    measured by hand on the default CNN at batch 64 (2 cores), a ReLU backward given mixed layouts 6.3 ms against
    0.63 ms in one layout."""
    return channels_last_copies(fm.params, wants_channels_last(fm.device, has_conv))


def _channel_gram(x: torch.Tensor) -> torch.Tensor:
    """Σ over examples and positions of x[:, :, t] x[:, :, t]ᵀ for x [B, C, H, W], in x's dtype: one [C, C] matmul
    over the positions as rows (a view of a channels-last x; a copy of a default-layout one)."""
    flat = x.movedim(1, -1).reshape(-1, x.shape[1])
    return flat.T @ flat


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
        """A linear layer's input → [B, T, in] (+ a column of ones for the bias)."""
        a = inp.reshape(inp.shape[0], -1, inp.shape[-1])
        if self.bias is not None:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        return a

    def input_sums(self, inp: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Σ aₜaₜᵀ [in, in] over the batch's examples and positions, and the number of positions summed.  A
        convolution's bias row and column are the patches' sums and the count (no concatenated column of ones);
        see :func:`_gram` for the products."""
        if self.conv is None:
            a = self.linear_inputs(inp)
            a2 = a.reshape(-1, a.shape[-1])
            return a2.T @ a2, a.shape[0] * a.shape[1]
        patches = F.unfold(inp, **self.conv)  # [B, C·kh·kw, T]
        A, positions = _gram(patches), patches.shape[0] * patches.shape[2]
        if self.bias is not None:
            col = patches.sum((0, 2))
            A = torch.cat([torch.cat([A, col[:, None]], 1),
                           torch.cat([col, col.new_tensor([float(positions)])])[None, :]], 0)
        return A, positions

    def output_sums(self, delta: torch.Tensor) -> torch.Tensor:
        """Σ δₜδₜᵀ [out, out] over the batch's examples and positions, for one output cotangent's gradients at the
        layer's output (shaped as the output, in either memory layout)."""
        if self.conv is None:
            d = delta.reshape(-1, delta.shape[-1])
            return d.T @ d
        return _channel_gram(delta)

    def rotated_inputs(self, inp: torch.Tensor, QA: torch.Tensor) -> torch.Tensor:
        """Q_Aᵀ aₜ for every example and position, [B, T, in]: the half of (Q_Sᵀ Gᵢ Q_A) that does not depend on the
        output cotangent (computed once per batch).  A convolution never forms its unfolded patches: it is one
        conv2d with Q_A's columns as kernels (and the bias column's row as the convolution's bias)."""
        if self.conv is None:
            return self.linear_inputs(inp) @ QA
        c = self.conv
        weights = QA[: QA.shape[0] - int(self.bias is not None)].T  # [in, C·kh·kw]: row j = eigenvector j
        kernels = weights.reshape(len(weights), inp.shape[1], *c["kernel_size"])
        if inp.is_contiguous(memory_format=torch.channels_last):
            kernels = kernels.contiguous(memory_format=torch.channels_last)
        a = F.conv2d(inp, kernels, bias=QA[-1] if self.bias is not None else None, stride=c["stride"],
                     padding=c["padding"], dilation=c["dilation"])  # [B, in, H', W']
        return a.movedim(1, -1).reshape(a.shape[0], -1, a.shape[1])  # a view when channels-last

    def rotated_gradients(self, rotated: torch.Tensor, delta: torch.Tensor, QS: torch.Tensor) -> torch.Tensor:
        """(Q_Sᵀδ [B, T, out], Q_Sᵀ Gᵢ Q_A [B, out, in] or None at one position) for one batch of gradients at the
        layer's output (shaped as the output, in either memory layout) and :meth:`rotated_inputs`:
        Σₜ (Q_Sᵀ δₜ)(Q_Aᵀ aₜ)ᵀ as one batched matmul [B, out, T]·[B, T, in], with Q_Sᵀ applied to whichever is
        smaller, δ (B·T·out² products) or the [B, out, in] result (B·out²·in): δ when T < in.  At one position the
        callers use the rank-one product (Q_Sᵀδ)(Q_Aᵀa)ᵀ without forming it.  ``QS``: on the device, in the dtype."""
        d = delta.reshape(delta.shape[0], -1, delta.shape[-1]) if self.conv is None else \
            delta.movedim(1, -1).reshape(delta.shape[0], -1, delta.shape[1])  # [B, T, out]
        positions, inputs = rotated.shape[1], rotated.shape[2]
        if positions == 1 or positions < inputs:
            u = d @ QS
            return u, None if positions == 1 else torch.bmm(u.transpose(1, 2), rotated)
        return d, QS.T @ torch.bmm(d.transpose(1, 2), rotated)

    def rotated_squares(self, rotated: torch.Tensor, delta: torch.Tensor, QS: torch.Tensor) -> torch.Tensor:
        """Σ over the batch's examples of (Q_Sᵀ Gᵢ Q_A)² [out, in] for one output cotangent (the EK-FAC correction's
        sum; :meth:`rotated_gradients`)."""
        u, Z = self.rotated_gradients(rotated, delta, QS)
        if Z is None:  # one position: (Q_Sᵀδ)² ((Q_Aᵀa)²)ᵀ, no [B, out, in] tensor
            return u[:, 0].pow(2).T @ rotated[:, 0].pow(2)
        return Z.pow(2).sum(0)


#: from this many backward passes per batch the fit says that sampled labels would take one
MANY_DIRECTIONS = 16


def leading_factors(objective: Objective, logits: torch.Tensor, trace_tol: float) -> torch.Tensor:
    """The first r of :meth:`~trainfluence.objective.Objective.output_hessian_factors` [K − 1, B, K] (each
    example's eigen-directions of H_f, largest first; one backward pass each): the fewest whose eigenvalues sum to at
    least (1 − ``trace_tol``) of the batch's trace Σᵢ tr H_f,ᵢ.  What is left out, Σᵢ Jᵢᵀ(H_f,ᵢ − Σ_{c≤r} u_c u_cᵀ)Jᵢ,
    is positive semi-definite, so the estimate only lowers the curvature, by at most ``trace_tol`` of it in output
    space.  A trained classifier's H_f = diag(p) − ppᵀ is concentrated on its few likely classes: on the default CNN
    and the MLP (MNIST 5,000) r = 4–6 of 9 at 0.01, with influence at Pearson 1.0000 to the full sum."""
    factors = objective.output_hessian_factors(logits)
    if trace_tol <= 0 or len(factors) <= 1:
        return factors
    mass = factors.double().pow(2).sum((1, 2))  # [K − 1]: Σᵢ λ_c,ᵢ = Σᵢ ‖u_c,ᵢ‖²
    kept = mass.cumsum(0) / mass.sum().clamp_min(torch.finfo(torch.float64).tiny)
    r = int((kept < 1 - trace_tol).sum()) + 1
    return factors[: min(r, len(factors))]


@dataclass
class KroneckerCurvature:
    """Block-diagonal GGN approximation over ``fm``'s selected parameters; ``corrected``: EK-FAC, else K-FAC."""

    fm: FunctionalModel
    objective: Objective
    corrected: bool = True
    labels: str = "exact"  # exact: H_f's K − 1 factors per example | sampled: one label drawn per example
    seed: int = 0  # of the sampled labels
    trace_tol: float = 0.0  # exact labels: the share of each batch's trace of H_f left out (:func:`leading_factors`)
    layers: list[_Layer] = field(default_factory=list)
    diagonal: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter name → its diagonal estimate
    examples: int = 0
    batch_size: int = 0  # examples per batch the fit took
    directions: float = 0.0  # output directions (backward passes) per batch of the factor pass, on average

    def __post_init__(self) -> None:
        self.layers = [_Layer(m.module, m.weight, m.bias, m.conv) for m in kronecker_modules(self.fm)]
        covered = {n for layer in self.layers for n in (layer.weight, layer.bias) if n}
        self.diagonal = {n: torch.zeros(self.fm.params[n].shape, dtype=torch.float64) for n in self.fm.names if n not in covered}
        # BatchNorm γ, β whose per-example gradients come from the same backward passes (:func:`norm_gradients`);
        # any other parameter outside the Kronecker blocks takes the per-example vmap path (:meth:`_diagonal_pass`)
        self.norms = hooked_norms(self.fm)
        by_hook = {n for pair in self.norms.values() for n in pair}
        self._vmapped = [n for n in self.diagonal if n not in by_hook]
        self._modules = dict(self.fm.module.named_modules())
        self._whitened: tuple[float, list] | None = None  # :meth:`_whitening`'s last result

    # ---- estimation ----------------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, layout: dict[str, torch.Tensor], hooked: list[str]):
        """Logits, and the input and (graph-connected) output of each ``hooked`` module for batch x; with ``layout``
        (channels-last weights from :func:`channels_last_params`) the pass runs channels-last."""
        inputs: dict[str, torch.Tensor] = {}
        outputs: dict[str, torch.Tensor] = {}
        relayout = {layer.module for layer in self.layers if layer.conv is not None} if layout else set()

        def hook_for(name: str):
            fmt = torch.channels_last if name in relayout else torch.preserve_format

            def hook(_m, inp, out):
                inputs[name] = inp[0].detach()
                outputs[name] = out
                return out.clone(memory_format=fmt)  # what follows (an in-place ReLU) must not change the recording
            return hook

        handles = [self._modules[name].register_forward_hook(hook_for(name)) for name in hooked]
        params = {n: p.detach().requires_grad_(True) for n, p in (self.fm.params | layout).items()}
        try:
            with torch.enable_grad():
                logits = self.objective.outputs(lambda inp: self.fm(params, inp), x)
        finally:
            for h in handles:
                h.remove()
        return logits, inputs, outputs

    def _forward_in(self, x: torch.Tensor, layout: dict[str, torch.Tensor], hooked: list[str]):
        """:meth:`_forward` channels-last when ``layout`` is given, in the default layout when the model's code
        raises on it (plain autograd, so the retry is safe); also returns the layout that worked, to keep."""
        try:
            return (*self._forward(x, layout, hooked), layout)
        except RuntimeError:
            if not layout:
                raise
            return (*self._forward(x, {}, hooked), {})

    def _passes(self, source: ExampleSource, batches: list[np.ndarray], desc: str, progress: bool, norms: bool = False):
        """For every batch: (x, its output cotangents u_c [K − 1, B, K] from
        :meth:`~trainfluence.objective.Objective.output_hessian_factors` — [1, B, K] from
        :meth:`~trainfluence.objective.Objective.sampled_output_factors` with ``labels="sampled"`` —, the hooked
        modules' inputs, and a generator
        of one backward pass per u_c: the gradients at the layers' outputs, then (``norms``) at the hooked
        BatchNorms' outputs).

        One backward pass per cotangent rather than one batched over them (vmap): vmap's batching rule for a
        convolution's backward runs one backward per cotangent anyway and concatenates the results.  Measured by
        hand on the default CNN, 512 MNIST images (2 cores): the EK-FAC fit in 6.6–7.1 s per cotangent and
        channels-last against 10.4–10.5 s batched; on the MLP (5,000 images, no convolution) the two were not told
        apart (1.00–1.39 s against 0.95–1.19 s over 8 fits each).

        Channels-last on the CPU (:func:`channels_last_params`); a model whose code needs the default layout
        (``x.view(len(x), -1)`` after a convolution) raises in that pass, and the fit goes back to the default
        layout for good (plain autograd, so the retry is safe)."""
        layout = channels_last_params(self.fm, any(layer.conv is not None for layer in self.layers))
        hooked = [layer.module for layer in self.layers] + (list(self.norms) if norms else [])
        for sel in bar(batches, desc=desc, unit="batch", disable=not progress):
            x, _ = source.tensors(sel)
            logits, inputs, outputs, layout = self._forward_in(x.to(self.fm.device), layout, hooked)
            targets = [outputs[name] for name in hooked]
            factors = (leading_factors(self.objective, logits.detach(), self.trace_tol) if self.labels == "exact" else
                       self.objective.sampled_output_factors(logits, self._generator))

            def deltas(factors=factors, logits=logits, targets=targets):
                for c, u in enumerate(factors if targets else []):
                    yield torch.autograd.grad(logits, targets, grad_outputs=u, retain_graph=c < len(factors) - 1)

            yield x, factors, inputs, deltas()

    def _diagonal_pass(self, x: torch.Tensor, factors: torch.Tensor) -> None:
        """Σᵢ E_y[gᵢ²] for the parameters outside Kronecker blocks and hooked BatchNorms (per-example gradients of
        the pseudo-losses with the batch's output cotangents ``factors``)."""
        names = self._vmapped
        if not names:
            return
        fixed = {n: p for n, p in self.fm.params.items() if n not in self.diagonal}

        def pseudo(own: dict[str, torch.Tensor], xi: torch.Tensor, ui: torch.Tensor) -> torch.Tensor:
            out = self.objective.outputs(lambda inp: self.fm({**fixed, **own}, inp), xi.unsqueeze(0))
            return (out.squeeze(0) * ui).sum()

        own = {n: self.fm.params[n] for n in names}
        for u in factors:
            per_example = vmap(grad(pseudo), in_dims=(None, 0, 0))(own, x, u.to(x.dtype))
            for n in names:
                self.diagonal[n] += per_example[n].double().pow(2).sum(0).cpu()

    def batch_within(self, example: torch.Tensor, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
        """Examples per factor batch whose working memory fits in ``memory_budget`` bytes (at least 1), from one
        example's shapes.  Per example, in values of the model's dtype: its activations ×4 (forward, backward,
        saved intermediates, as :func:`~trainfluence.gradients.vmap_batch_size` counts them), plus the larger of
        the two passes' own tensors — the first pass's unfolded patches of one layer and their copy (2·T·in), the
        correction's rotated inputs of every layer (Σ T·in, held across the cotangents) and one layer's
        [out, in] products (×3: the batched product, its rotation, its square; none when T = 1).

        Measured by hand on torchvision's resnet18 at 32×32 (128 shapes images, 2 cores): the fit at 128 per batch
        peaked at 10.4 GiB resident, the correction's [128, 512, 4608] products and the rotated inputs of layer1
        (4 × 302 MB) its largest tensors; at the 14 this gives for 1 GiB, 4.5 GiB (scripts/bench_large_model.py
        measures whole commands)."""
        shapes: dict[str, tuple[int, int, int]] = {}  # module → (T, in, out)

        def hook_for(layer: _Layer):
            def hook(_m, inp, out):
                if layer.conv is None:
                    t = inp[0].numel() // inp[0].shape[-1]
                    shapes[layer.module] = (t, inp[0].shape[-1] + (layer.bias is not None), out.shape[-1])
                else:
                    kh, kw = layer.conv["kernel_size"]
                    shapes[layer.module] = (out.shape[2] * out.shape[3], inp[0].shape[1] * kh * kw + (layer.bias is not None),
                                            out.shape[1])
            return hook

        handles = [self._modules[layer.module].register_forward_hook(hook_for(layer)) for layer in self.layers]
        try:
            with torch.no_grad():
                self.fm(self.fm.params, example.unsqueeze(0).to(self.fm.device))
        finally:
            for h in handles:
                h.remove()
        patches = max((2 * t * i for t, i, _ in shapes.values()), default=0)
        rotated = sum(t * i for t, i, _ in shapes.values())
        products = max((3 * o * i for t, i, o in shapes.values() if t > 1), default=0)
        values = 4 * activation_numel(self.fm, example.to(self.fm.device)) + max(patches, rotated + products)
        itemsize = next(iter(self.fm.params.values())).element_size()
        return max(1, int(memory_budget // (itemsize * max(1, values))))

    def fit(self, source: ExampleSource, indices: np.ndarray, *, batch_size: int = 128,
            memory_budget: int | None = None, progress: bool = True) -> "KroneckerCurvature":
        """Estimate the factors (and, EK-FAC, the corrected eigenvalues) from the examples ``indices``,
        ``batch_size`` at a time — fewer when ``memory_budget`` (bytes) holds fewer (:meth:`batch_within`); the
        factors are the same sums whatever the batch (to rounding)."""
        if memory_budget is not None and len(indices):
            x, _ = source.tensors(indices[:1])
            batch_size = min(batch_size, self.batch_within(x[0], memory_budget))
        batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
        # labels="sampled": the draws of this fit's passes (:meth:`_passes`), the same for the same examples and batches
        self._generator = torch.Generator().manual_seed(self.seed)
        positions = {layer.module: 0.0 for layer in self.layers}
        passes = 0
        # products in the model's dtype, sums of batches in float64
        A = {layer.module: 0.0 for layer in self.layers}
        S = {layer.module: 0.0 for layer in self.layers}
        for x, factors, inputs, deltas in self._passes(source, batches, "kronecker factors", progress, norms=True):
            for layer in self.layers:
                a, count = layer.input_sums(inputs[layer.module])
                A[layer.module] += a.double()
                positions[layer.module] += count
            for grads in deltas:
                for layer, d in zip(self.layers, grads):
                    S[layer.module] += layer.output_sums(d).double()
                for (name, pair), d in zip(self.norms.items(), grads[len(self.layers):]):
                    for n, g in zip(pair, norm_gradients(self._modules[name], inputs[name], d)):
                        self.diagonal[n] += g.double().pow(2).sum(0).cpu()
            self._diagonal_pass(x, factors)
            if not passes and self.labels == "exact" and len(factors) >= MANY_DIRECTIONS:
                note(f"the Kronecker fit takes {len(factors)} of the K − 1 = {factors.shape[-1] - 1} backward passes per "
                     "batch (the predictions are spread over many classes); --ekfac-labels sampled (--kfac-labels, "
                     "API labels='sampled') takes one per batch, a Monte Carlo estimate of the same curvature")
            passes += len(factors)
        self.examples, self.batch_size = len(indices), batch_size
        self.directions = passes / max(1, len(batches))
        for layer in self.layers:
            count = positions[layer.module]
            layer.positions = count / self.examples
            layer.A, layer.S = (A[layer.module] / count).cpu(), (S[layer.module] / count).cpu()
            require_finite(layer.A, f"the K-FAC input factor of {layer.module}", FIX_MODEL)
            require_finite(layer.S, f"the K-FAC output factor of {layer.module}", FIX_MODEL)
            la, layer.QA = symmetric_eigh(layer.A, rank_bound=int(count))  # A sums `count` outer products
            ls, layer.QS = symmetric_eigh(layer.S)
            layer.eig = layer.kfac_eig = layer.positions * ls.clamp_min(0)[:, None] * la.clamp_min(0)[None, :]
        for n in self.diagonal:
            self.diagonal[n] = self.diagonal[n] / max(1, self.examples)
        if self.corrected and self.layers:
            self._correct(source, batches, progress)
        return self

    def arrays(self) -> dict[str, np.ndarray]:
        """The fit as named arrays (what :mod:`trainfluence.store.curvature` keeps): per layer Q_A, Q_S, the
        eigenvalues (EK-FAC's or K-FAC's) and K-FAC's own, and T; the diagonal blocks; the examples and batch.  Not
        the factors A and S themselves, which nothing uses after their eigendecompositions."""
        out = {"examples": np.array(self.examples), "batch_size": np.array(self.batch_size),
               "directions": np.array(self.directions)}
        for layer in self.layers:
            for name in ("QA", "QS", "eig", "kfac_eig"):
                out[f"layer:{layer.module}:{name}"] = getattr(layer, name).numpy()
            out[f"layer:{layer.module}:positions"] = np.array(layer.positions)
        for n, d in self.diagonal.items():
            out[f"diagonal:{n}"] = d.numpy()
        return out

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        """Take a fit from :meth:`arrays` (of the same model and parameters); ValueError, with nothing changed, when
        the names, shapes or dtypes do not fit this model's layers or a value is not finite."""
        want: dict[str, tuple[int, ...]] = {"examples": (), "batch_size": (), "directions": ()}
        for layer in self.layers:
            w = self.fm.params[layer.weight]
            out, inp = w.shape[0], int(np.prod(w.shape[1:])) + (layer.bias is not None)
            want |= {f"layer:{layer.module}:QA": (inp, inp), f"layer:{layer.module}:QS": (out, out),
                     f"layer:{layer.module}:eig": (out, inp), f"layer:{layer.module}:kfac_eig": (out, inp),
                     f"layer:{layer.module}:positions": ()}
        want |= {f"diagonal:{n}": tuple(d.shape) for n, d in self.diagonal.items()}
        if set(arrays) != set(want):
            raise ValueError(f"arrays {sorted(set(arrays) ^ set(want))[:3]} do not match the model's layers")
        for name, shape in want.items():
            a = arrays[name]
            if a.shape != shape or (shape and a.dtype != np.float64) or not np.isfinite(a).all():
                raise ValueError(f"{name}: shape {a.shape} or dtype {a.dtype} or values wrong")
        tensor = {name: torch.from_numpy(np.array(a)) for name, a in arrays.items() if a.shape}
        for layer in self.layers:
            key = f"layer:{layer.module}:"
            layer.QA, layer.QS, layer.eig, layer.kfac_eig = (tensor[key + n] for n in ("QA", "QS", "eig", "kfac_eig"))
            layer.positions, layer.A, layer.S = float(arrays[key + "positions"]), None, None
        self.diagonal = {n: tensor[f"diagonal:{n}"] for n in self.diagonal}
        self.examples, self.batch_size = int(arrays["examples"]), int(arrays["batch_size"])
        self.directions = float(arrays["directions"])
        self._whitened = None

    def uncorrected(self) -> "KroneckerCurvature":
        """K-FAC from the same factors (what ``fit`` with ``corrected=False`` on the same examples gives), without
        another pass over the data: EK-FAC keeps K-FAC's eigenvalues beside its own."""
        if not self.corrected:
            return self
        plain = KroneckerCurvature(self.fm, self.objective, corrected=False, labels=self.labels, seed=self.seed,
                                   trace_tol=self.trace_tol)
        plain.layers = [replace(layer, eig=layer.kfac_eig) for layer in self.layers]
        plain.diagonal, plain.examples, plain.batch_size = self.diagonal, self.examples, self.batch_size
        plain.directions = self.directions
        return plain

    def _correct(self, source: ExampleSource, batches: list[np.ndarray], progress: bool) -> None:
        """EK-FAC: the eigenvalues re-estimated as E[(Q_Sᵀ Gᵢ Q_A)²] in the K-FAC eigenbasis."""
        sums = {layer.module: torch.zeros_like(layer.eig) for layer in self.layers}
        # in each layer's dtype (its products run in it; the sums in float64), converted once for the whole pass
        bases = [tuple(Q.to(self.fm.device, self.fm.params[layer.weight].dtype) for Q in (layer.QA, layer.QS))
                 for layer in self.layers]
        for _x, _factors, inputs, deltas in self._passes(source, batches, "ek-fac eigenvalues", progress):
            rotated = [layer.rotated_inputs(inputs[layer.module], QA) for layer, (QA, _) in zip(self.layers, bases)]
            batch = [0.0] * len(self.layers)
            for grads in deltas:
                for i, (layer, d) in enumerate(zip(self.layers, grads)):
                    batch[i] = batch[i] + layer.rotated_squares(rotated[i], d, bases[i][1])
            for layer, total in zip(self.layers, batch):
                sums[layer.module] += total.double().cpu()
        for layer in self.layers:
            layer.eig = sums[layer.module] / self.examples
            require_finite(layer.eig, f"the EK-FAC eigenvalues of {layer.module}", FIX_MODEL)

    def _whitening(self, damping: float) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per layer (Q_A, Q_S, 1/(Λ + d)) on the model's device and in its dtype, made once per damping and kept
        (a resnet18's are 0.4 GB of float32: converting them for every batch was work done again each time)."""
        if self._whitened is None or self._whitened[0] != damping:
            device = self.fm.device
            self._whitened = (damping, [tuple(t.to(device, self.fm.params[layer.weight].dtype) for t in
                                              (layer.QA, layer.QS, (layer.eig.to(device) + damping).reciprocal()))
                                        for layer in self.layers])
        return self._whitened[1]

    def example_quadratic_forms(self, x: torch.Tensor, y: torch.Tensor, damping: float) -> torch.Tensor:
        """gᵢᵀP⁻¹gᵢ [B] (float64) for the examples (x, y), gᵢ = ∇ℓ(zᵢ) over the selected parameters — what
        :meth:`whiten` of the stored gradients gives, without forming gᵢ.  One forward pass and one backward pass of
        Σᵢ ℓᵢ (eval mode: each example's gradient at a layer's output is its own), then per layer

            ‖(Q_Sᵀ Gᵢ Q_A) / √(Λ + d)‖²,   Q_Sᵀ Gᵢ Q_A = Σₜ (Q_Sᵀ δₜ)(Q_Aᵀ aₜ)ᵀ,

        from the rotated inputs and gradients as the EK-FAC correction forms them: about T·(in² + out² + out·in)
        multiply-adds per example and layer, against out·in·(out + in) to rotate a formed Gᵢ (resnet18's 512 × 4608
        convolutions at 4×4 positions: 0.38 G against 12.1 G).  BatchNorm's γ, β from the same pass
        (:func:`norm_gradients`), other parameters' per-example gradients by vmap.  ``x``: at most
        :meth:`batch_within` examples for the memory budget."""
        layout = channels_last_params(self.fm, any(layer.conv is not None for layer in self.layers))
        hooked = [layer.module for layer in self.layers] + list(self.norms)
        x, y = x.to(self.fm.device), y.to(self.fm.device)
        logits, inputs, outputs, _ = self._forward_in(x, layout, hooked)
        loss = self.objective.loss(logits, y).sum()
        grads = torch.autograd.grad(loss, [outputs[name] for name in hooked]) if hooked else ()
        out = torch.zeros(len(x), dtype=torch.float64, device=self.fm.device)
        for layer, d, (QA, QS, scale) in zip(self.layers, grads, self._whitening(damping)):
            rotated = layer.rotated_inputs(inputs[layer.module], QA)  # [B, T, in]
            u, Z = layer.rotated_gradients(rotated, d, QS)
            if Z is None:  # one position: Σ_oj (u_o v_j)² / (Λ + d)_oj = Σ_j ((u²) W)_j v_j²
                out += (u[:, 0].pow(2) @ scale * rotated[:, 0].pow(2)).sum(1, dtype=torch.float64)
            else:
                out += (Z.pow(2) * scale).sum((1, 2), dtype=torch.float64)
        for (name, pair), d in zip(self.norms.items(), grads[len(self.layers):]):
            for n, g in zip(pair, norm_gradients(self._modules[name], inputs[name], d)):
                out += (g.double().pow(2) / (self.diagonal[n].to(g.device) + damping)).sum(1)
        if self._vmapped:
            fixed = {n: p for n, p in self.fm.params.items() if n not in self._vmapped}

            def loss_of(own: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
                f = self.objective.outputs(lambda inp: self.fm({**fixed, **own}, inp), xi.unsqueeze(0))
                return self.objective.loss(f, yi.unsqueeze(0)).squeeze(0)

            own = {n: self.fm.params[n] for n in self._vmapped}
            per_example = vmap(grad(loss_of), in_dims=(None, 0, 0))(own, x, y)
            for n in self._vmapped:
                g = per_example[n].double().flatten(1)
                out += (g.pow(2) / (self.diagonal[n].to(g.device).flatten() + damping)).sum(1)
        return out.cpu()

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
