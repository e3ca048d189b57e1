"""Saliency names the command line needs before anything heavy is imported."""

from __future__ import annotations

#: registered saliency methods (implemented in :mod:`trainfluence.saliency`, one module each)
METHOD_NAMES = ("gradient", "grad_x_input", "guided_backprop", "integrated_gradients", "smoothgrad", "vargrad",
                "grad_cam", "occlusion", "internal_influence")
DEFAULT_METHODS = ("gradient", "grad_x_input", "guided_backprop", "integrated_gradients", "smoothgrad", "grad_cam",
                   "occlusion", "internal_influence")
