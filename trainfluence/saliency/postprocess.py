"""From attributions to pixels: importance maps, top-k masks, boxes, and the scores that compare them to boxes.

* importance: Σ over channels of |attr| → one map [H, W] per image.
* top-k mask: the k most important pixels (ties broken by pixel order).
* box policy (fixed): keep pixels with importance ≥ ``BOX_THRESHOLD`` × the map's maximum, take the largest
  8-connected component (``scipy.ndimage.label``), and return its extent (x0, y0, x1, y1), inclusive.
* pointing game (Zhang et al. 2016): a hit when the most important pixel lies in the ground-truth box grown by
  ``tolerance`` pixels on each side (their 15 px at 224 px is ≈ 2 px at 32 px, the default here).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

BOX_THRESHOLD = 0.3
POINTING_TOLERANCE = 2


def importance(attr: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] attributions → [B, H, W] non-negative importance."""
    return attr.detach().abs().sum(1)


def topk_mask(imp: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean [B, H, W]: the k most important pixels of each map."""
    b, h, w = imp.shape
    flat = imp.reshape(b, -1)
    k = max(0, min(k, h * w))
    idx = torch.argsort(flat, dim=1, descending=True, stable=True)[:, :k]
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    return mask.view(b, h, w)


def box_from_map(imp: np.ndarray | torch.Tensor, threshold: float = BOX_THRESHOLD) -> tuple[int, int, int, int]:
    """The box around the largest 8-connected region of pixels ≥ threshold × max (one [H, W] map)."""
    m = imp.detach().cpu().numpy() if isinstance(imp, torch.Tensor) else np.asarray(imp)
    top = float(m.max())
    if top <= 0:
        h, w = m.shape
        return (0, 0, w - 1, h - 1)
    labels, count = ndimage.label(m >= threshold * top, structure=np.ones((3, 3)))
    sizes = ndimage.sum(np.ones_like(m), labels, index=np.arange(1, count + 1))
    ys, xs = np.nonzero(labels == int(np.argmax(sizes)) + 1)
    return (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))


def box_iou(a: tuple[int, ...] | np.ndarray, b: tuple[int, ...] | np.ndarray) -> float:
    """Intersection over union of two inclusive pixel boxes (x0, y0, x1, y1)."""
    ax0, ay0, ax1, ay1 = (int(v) for v in a)
    bx0, by0, bx1, by1 = (int(v) for v in b)
    iw = max(0, min(ax1, bx1) - max(ax0, bx0) + 1)
    ih = max(0, min(ay1, by1) - max(ay0, by0) + 1)
    inter = iw * ih
    union = (ax1 - ax0 + 1) * (ay1 - ay0 + 1) + (bx1 - bx0 + 1) * (by1 - by0 + 1) - inter
    return inter / union


def pointing_hit(imp: torch.Tensor, box: tuple[int, ...] | np.ndarray, tolerance: int = POINTING_TOLERANCE) -> bool:
    h, w = imp.shape
    y, x = divmod(int(torch.argmax(imp.reshape(-1))), w)
    x0, y0, x1, y1 = (int(v) for v in box)
    return x0 - tolerance <= x <= x1 + tolerance and y0 - tolerance <= y <= y1 + tolerance
