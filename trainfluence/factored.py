"""Factored projection of per-example gradients (LoGra, Choe et al. 2024, "What is your data worth to GPT?").

For a Linear or Conv2d layer the per-example gradient of its weight (with a selected bias as one more input
column fed by 1) is Gᵢ = Σₜ δₜ aₜᵀ: aₜ the layer's input at position t (unfolded patches for a convolution), δₜ
the gradient at its output.  Projecting it with a Kronecker-structured matrix P_out ⊗ P_in gives

    (P_out ⊗ P_in) vec(Gᵢ) = vec(Σₜ (P_out δₜ)(P_in aₜ)ᵀ),

which needs only the layer's inputs and output gradients — both available from one batched forward and backward
pass of Σᵢ ℓᵢ (examples are independent in eval mode) — at O(T·(d_in·k_in + d_out·k_out + k_in·k_out)) per example
instead of forming the d_out × d_in gradient.  P_out [k_out, d_out] and P_in [k_in, d_in] have N(0, 1/k) entries,
so E⟨Pa, Pb⟩ = ⟨a, b⟩.  Its variance is larger than a CountSketch into the same k_out·k_in coordinates: for
gradient matrices A and B,

    Var⟨Pa, Pb⟩ ≤ (2/k_out + 2/k_in + 4/(k_out k_in)) ‖A‖²_F ‖B‖²_F

(condition on P_in: a Gaussian sketch of A P_inᵀ, B P_inᵀ; then the variance of ⟨A P_inᵀ, B P_inᵀ⟩ itself), against
2/(k_out k_in) for CountSketch — the price of never forming the gradient.  A side that keeps all its coordinates
(k = d) is copied, not sketched, and drops its terms from the bound.  A BatchNorm2d in eval mode with running
statistics, y = γ·x̂ + β with x̂ = (x − μ)/√(σ² + ε), gets its per-example gradients from the same pass
(∂ℓᵢ/∂γ = Σₜ δₜ x̂ₜ, ∂ℓᵢ/∂β = Σₜ δₜ per channel) and a CountSketch of its block; any other parameter is handled by
the per-example ``vmap`` path and a CountSketch.

On the CPU the pass runs channels-last (its own copies of the weights; the model is untouched; see
:func:`~trainfluence.kfac.channels_last_params`); a model whose code needs the default layout falls back to it.

The output coordinates are laid out block by block in the order of the selected parameters: a Kronecker layer's
k_out·k_in coordinates where its weight comes (its bias has none of its own), every other parameter's where it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from .kfac import channels_last_params, hooked_norms, kronecker_modules, norm_gradients
from .objective import FunctionalModel, Objective
from .projection import _block_generator


@dataclass
class FactoredLayer:
    module: str
    weight: str
    bias: str | None
    conv: dict | None  # unfold arguments for a convolution
    d_out: int
    d_in: int  # including the bias column
    k_out: int
    k_in: int

    @property
    def dim(self) -> int:
        return self.k_out * self.k_in


def factored_layers(fm: FunctionalModel) -> list[FactoredLayer]:
    """The selected parameters' Linear and Conv2d layers (k_out, k_in not yet chosen: 0)."""
    return [FactoredLayer(m.module, m.weight, m.bias, m.conv, fm.params[m.weight].shape[0],
                          fm.params[m.weight][0].numel() + int(m.bias is not None), 0, 0) for m in kronecker_modules(fm)]


SIMD_WIDTH = 16  # a sketched input side is a multiple of this: convolution kernels run in blocks of 16 channels


def split_dims(k: int, d_out: int, d_in: int) -> tuple[int, int]:
    """k_out · k_in ≤ k with k_out ≤ d_out, k_in ≤ d_in, the two as balanced as the shapes allow (the variance bound
    2/k_out + 2/k_in is smallest when they are equal).  A sketched k_in above 16 is rounded down to a multiple of
    ``SIMD_WIDTH`` and k_out takes up the rest: P_in runs as a convolution with k_in output channels, and 17 of
    them cost three times 16 (oneDNN on CPU: 18.4 against 5.9 ms for a 128×24×28×28 input)."""
    k_out = int(min(d_out, max(1, round(np.sqrt(k)))))
    k_in = int(min(d_in, max(1, k // k_out)))
    if SIMD_WIDTH < k_in < d_in:
        k_in -= k_in % SIMD_WIDTH
    k_out = int(min(d_out, max(1, k // k_in)))
    return k_out, k_in


class FactoredProjector:
    """The projection P of every selected parameter block: P_out ⊗ P_in for the Kronecker layers, CountSketch (or
    a copy, when a block keeps all its coordinates) for the rest.  ``layout`` maps a Kronecker layer's module to
    (k_out, k_in) and any other parameter to its number of output coordinates."""

    def __init__(self, fm: FunctionalModel, objective: Objective, layout: dict[str, list[int]], seed: int = 0):
        self.fm, self.objective, self.seed = fm, objective, seed
        self.layers = [layer for layer in factored_layers(fm) if layer.module in layout]
        for layer in self.layers:
            layer.k_out, layer.k_in = layout[layer.module]
        covered = {n for layer in self.layers for n in (layer.weight, layer.bias) if n}
        self.others = [n for n in fm.names if n not in covered]
        self.other_dims = {n: int(layout[n][0]) for n in self.others}
        device = fm.device
        self.P_out, self.P_in, self.buckets, self.signs = {}, {}, {}, {}
        for b, layer in enumerate(self.layers):  # a side that keeps all its coordinates is copied, not sketched
            g = _block_generator(seed, 10_000 + b)
            self.P_out[layer.module] = (torch.eye(layer.d_out) if layer.k_out == layer.d_out else
                                        torch.randn(layer.k_out, layer.d_out, generator=g) / layer.k_out**0.5).to(device)
            self.P_in[layer.module] = (torch.eye(layer.d_in) if layer.k_in == layer.d_in else
                                       torch.randn(layer.k_in, layer.d_in, generator=g) / layer.k_in**0.5).to(device)
        for b, n in enumerate(self.others):
            size, width = self.fm.params[n].numel(), self.other_dims[n]
            if width < size:
                g = _block_generator(seed, 20_000 + b)
                self.buckets[n] = torch.randint(0, width, (size,), generator=g).to(device)
                self.signs[n] = (torch.randint(0, 2, (size,), generator=g) * 2 - 1).float().to(device)
        # output layout, in the order of the selected parameters
        self.slots: list[tuple[str, str, int]] = []  # (kind, name, width)
        first = {layer.weight: layer for layer in self.layers}
        for n in fm.names:
            if n in first:
                self.slots.append(("layer", first[n].module, first[n].dim))
            elif n in self.other_dims:
                self.slots.append(("other", n, self.other_dims[n]))
        self.dim = sum(width for _, _, width in self.slots)
        self.norms = hooked_norms(fm)
        by_hook = {n for pair in self.norms.values() for n in pair}
        self.vmapped = [n for n in self.others if n not in by_hook]
        self._per_example_others = None
        self._copied: set[str] = set()  # hooked modules whose input or output the model changes in place
        self._modules = dict(fm.module.named_modules())
        # On the CPU the pass runs channels-last (see :meth:`_hooked_pass`): the convolutions' projection kernels
        # (P_in's rows) and the pass's copies of the 4-D weights are made once, here
        self._kernels: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            if layer.conv is not None:
                w_in = self.P_in[layer.module][:, : layer.d_in - int(layer.bias is not None)]
                kernel = w_in.reshape(len(w_in), -1, *layer.conv["kernel_size"])
                self._kernels[layer.module] = kernel.contiguous(memory_format=torch.channels_last)
        self._cl_params = channels_last_params(fm, bool(self._kernels))  # emptied if the model refuses the layout
        if self.vmapped:
            fixed = {n: p for n, p in fm.params.items() if n not in self.vmapped}

            def loss(own, xi, yi):
                out = objective.outputs(lambda inp: fm({**fixed, **own}, inp), xi.unsqueeze(0))
                return objective.loss(out, yi.unsqueeze(0)).squeeze(0)

            self._per_example_others = vmap(grad(loss), in_dims=(None, 0, 0))

    @property
    def channels_last(self) -> bool:
        """Whether the hooked pass runs channels-last (:func:`~trainfluence.kfac.channels_last_params`)."""
        return bool(self._cl_params)

    @staticmethod
    def variance_factor(layer: FactoredLayer) -> float:
        """c with Var⟨Pa, Pb⟩ ≤ c ‖A‖²‖B‖² for the layer (a side copied exactly adds nothing)."""
        out = 2 / layer.k_out if layer.k_out < layer.d_out else 0.0
        inp = 2 / layer.k_in if layer.k_in < layer.d_in else 0.0
        return out + inp + out * inp

    # ---- projecting vectors given in parameter space (s_test, tests) ---------------------------------------------
    def _sketch_other(self, n: str, block: torch.Tensor) -> torch.Tensor:
        """[m, size] → [m, width] (a copy when the block keeps all its coordinates)."""
        if n not in self.buckets:
            return block.float()
        out = torch.zeros(block.shape[0], self.other_dims[n], device=block.device)
        return out.index_add_(1, self.buckets[n], block.float() * self.signs[n])

    def _layer_matrix(self, layer: FactoredLayer, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        W = parts[layer.weight].reshape(parts[layer.weight].shape[0], layer.d_out, -1)
        if layer.bias is not None:
            W = torch.cat([W, parts[layer.bias].unsqueeze(-1)], dim=-1)
        return W

    def project(self, flat: torch.Tensor) -> torch.Tensor:
        """Flat vectors [m, p] → [m, k], by the dense Kronecker products P_out W P_inᵀ (the reference for the
        factored per-example path, and how s_test is projected)."""
        parts = self.fm.unflatten(flat.to(self.fm.device))
        pieces = []
        for kind, name, _width in self.slots:
            if kind == "layer":
                layer = next(L for L in self.layers if L.module == name)
                W = self._layer_matrix(layer, parts).float()
                pieces.append((self.P_out[name] @ W @ self.P_in[name].T).flatten(1))
            else:
                pieces.append(self._sketch_other(name, parts[name].flatten(1)))
        return torch.cat(pieces, dim=1)

    # ---- the factored per-example path ------------------------------------------------------------------------
    def _project_layer(self, layer: FactoredLayer, inp: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """P_out Gᵢ P_inᵀ for every example of the batch, [B, k_out, k_in], from the layer's input and output gradient.

        Channels first throughout: Aᵢ = P_in aᵢ,ₜ for every position t ([B, k_in, T]; for a convolution one conv2d
        with P_in's rows as kernels — unfold-then-matmul without the patches), then Mᵢ = Σₜ δᵢ,ₜ (P_in aᵢ,ₜ)ᵀ as one
        batched matmul [B, d_out, T]·[B, T, k_in] and P_out Mᵢ last (cheaper than projecting δ first when
        d_out·k_in < k_out·(d_out + k_in), as for :func:`split_dims`'s k_in ≤ k_out).  A bias, an input fixed at 1,
        adds the rank-one term (Σₜ δᵢ,ₜ) p_biasᵀ."""
        P_in, P_out = self.P_in[layer.module], self.P_out[layer.module]
        has_bias = layer.bias is not None
        B = inp.shape[0]
        if layer.conv is not None:
            c = layer.conv
            a_p = F.conv2d(inp, self._kernels[layer.module], stride=c["stride"], padding=c["padding"],
                           dilation=c["dilation"]).flatten(2)  # [B, k_in, T]
            d = delta.flatten(2)  # [B, d_out, T]
        else:  # a Linear layer acts on the last dimension; any others are positions
            w_in = P_in[:, : layer.d_in - int(has_bias)]
            a_p = (inp.reshape(B, -1, inp.shape[-1]) @ w_in.T).transpose(1, 2)  # [B, k_in, T]
            d = delta.reshape(B, -1, delta.shape[-1]).transpose(1, 2)  # [B, d_out, T]
        M = torch.bmm(d, a_p.transpose(1, 2))  # [B, d_out, k_in]
        if has_bias:
            M = M + d.sum(2, keepdim=True) * P_in[:, -1]
        return M if layer.k_out == layer.d_out else torch.matmul(P_out, M)  # P_out = I: nothing to do

    def _hooked_pass(self, x: torch.Tensor, y: torch.Tensor, copied: set[str]
                     ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor], set[str]]:
        """One batched forward of Σᵢ ℓᵢ recording each hooked module's input and output, then (unless a recording
        was changed in place afterwards) the backward to those outputs.  Modules in ``copied`` record copies.

        Returns (logits, losses, inputs, output gradients, modules whose recording changed in place): when that
        last set is not empty the backward was not run — differentiating with respect to a tensor an in-place
        operation changed (a ReLU(inplace=True) after a BatchNorm, a residual ``out += x``) would give the gradient
        of the changed tensor — and the pass must be repeated with those modules copied.

        With ``channels_last`` the pass runs in that layout (same values, float sums ordered differently; see
        :func:`~trainfluence.kfac.channels_last_params`): 4-D weights are copied channels-last and every hooked
        convolution's output is made so, which keeps the ops that follow (ReLU, pooling and their backward) in one
        layout."""
        fm = self.fm
        modules = self._modules
        channels_last = self.channels_last
        inputs: dict[str, torch.Tensor] = {}
        outputs: dict[str, torch.Tensor] = {}
        versions: dict[str, tuple[torch.Tensor, int, torch.Tensor, int]] = {}

        def hook_for(name: str):
            relayout = channels_last and name in self._kernels  # a convolution

            def hook(_m, inp, out):
                if name in copied:
                    inputs[name], outputs[name] = inp[0].detach().clone(), out
                    # what follows sees the copy; the recorded output stays as it was
                    return out.clone(memory_format=torch.channels_last if relayout else torch.preserve_format)
                inputs[name], outputs[name] = inp[0].detach(), out
                versions[name] = (inp[0], inp[0]._version, out, out._version)
                if relayout and not out.is_contiguous(memory_format=torch.channels_last):
                    return out.contiguous(memory_format=torch.channels_last)  # a copy: the recording stays
                return None
            return hook

        hooked = [layer.module for layer in self.layers] + list(self.norms)
        handles = [modules[name].register_forward_hook(hook_for(name)) for name in hooked]
        needs_graph = {L.weight for L in self.layers} | {pair[0] for pair in self.norms.values()}
        params = {n: p.detach().requires_grad_(n in needs_graph) for n, p in (fm.params | self._cl_params).items()}
        try:
            with torch.enable_grad():
                logits = self.objective.outputs(lambda inp: fm(params, inp), x)
                losses = self.objective.loss(logits, y)
                changed = {name for name, (a, va, o, vo) in versions.items() if a._version != va or o._version != vo}
                if changed:
                    return logits, losses, inputs, [], changed
                deltas = torch.autograd.grad(losses.sum(), [outputs[name] for name in hooked]) if hooked else []
        finally:
            for h in handles:
                h.remove()
        return logits, losses, inputs, list(deltas), set()

    def per_example(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projected per-example gradients [B, k], losses [B] and logits [B, K] from one batched forward and
        backward pass (plus the per-example path for parameters outside Kronecker layers).  A module's recordings
        are copied only once a pass has shown that the model changes them in place (remembered for later batches)."""
        fm = self.fm
        x, y = x.to(fm.device), y.to(fm.device)
        modules = self._modules
        while True:
            try:
                logits, losses, inputs, all_deltas, changed = self._hooked_pass(x, y, self._copied)
            except RuntimeError:  # model code that needs default-layout activations, e.g. ``x.view(len(x), -1)``
                if not self.channels_last:
                    raise
                self._cl_params = {}  # this model runs in the default layout from now on
                continue
            if not changed:
                break
            self._copied |= changed  # copied modules are not checked again: at most one repeat per hooked module
        deltas, norm_deltas = all_deltas[: len(self.layers)], all_deltas[len(self.layers):]
        projected: dict[str, torch.Tensor] = {}
        for layer, d in zip(self.layers, deltas):
            projected[layer.module] = self._project_layer(layer, inputs[layer.module], d).flatten(1)
        for (name, (gamma, beta)), d in zip(self.norms.items(), norm_deltas):
            g_gamma, g_beta = norm_gradients(modules[name], inputs[name], d)
            projected[gamma], projected[beta] = self._sketch_other(gamma, g_gamma), self._sketch_other(beta, g_beta)
        if self._per_example_others is not None:
            own = {n: fm.params[n] for n in self.vmapped}
            with torch.no_grad():
                per = self._per_example_others(own, x, y)
            for n in self.vmapped:
                projected[n] = self._sketch_other(n, per[n].flatten(1))
        out = torch.cat([projected[name] for _, name, _ in self.slots], dim=1)
        return out.float(), losses.detach(), logits.detach()


def layout_dim(layout: dict[str, list[int]]) -> int:
    """Output coordinates of a layout: k_out·k_in per Kronecker layer, the width of every other parameter."""
    return sum(int(np.prod(widths)) for widths in layout.values())


def factored_layout(fm: FunctionalModel, k: int, energies: dict[str, float]) -> dict[str, list[int]]:
    """Output coordinates per Kronecker layer (k_out, k_in) and per other parameter, k shared ∝ gradient energy
    (each layer's weight and bias energies together), capped at each block's size."""
    from .projection import allocate

    layers = factored_layers(fm)
    covered = {n for layer in layers for n in (layer.weight, layer.bias) if n}
    names = [layer.module for layer in layers] + [n for n in fm.names if n not in covered]
    sizes = [layer.d_out * layer.d_in for layer in layers] + [fm.params[n].numel() for n in fm.names if n not in covered]
    energy = [energies.get(layer.weight, 0.0) + (energies.get(layer.bias, 0.0) if layer.bias else 0.0) for layer in layers]
    energy += [energies.get(n, 0.0) for n in fm.names if n not in covered]
    dims = allocate(k, sizes, energy)
    layout: dict[str, list[int]] = {}
    for name, width, layer in zip(names, dims, layers + [None] * (len(names) - len(layers))):
        layout[name] = list(split_dims(width, layer.d_out, layer.d_in)) if layer is not None else [int(width)]
    return layout
