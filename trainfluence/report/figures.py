"""Image grids and thumbnails (PIL for plain thumbnails), and the one place matplotlib is set up: the Agg
backend (no display needed), imported lazily-safe as ``plt`` by every module that draws."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ..files import save_with  # noqa: E402

__all__ = ["Panel", "panel_grid", "plt", "save_figure", "save_thumbnail", "to_display"]


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically as PNG and close it."""
    try:
        return save_with(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        plt.close(fig)


def to_display(pixels: torch.Tensor) -> np.ndarray:
    """uint8 [C, H, W] (or float [C, H, W] in [0, 1]) → float HWC (or HW for one channel) in [0, 1]."""
    img = pixels.detach().cpu().float()
    if pixels.dtype == torch.uint8:
        img = img / 255.0
    img = img.permute(1, 2, 0).numpy()
    return img[..., 0] if img.shape[-1] == 1 else img


@dataclass
class Panel:
    image: np.ndarray | None  # HWC or HW in [0, 1]; None leaves the cell empty
    title: str = ""
    overlay: np.ndarray | None = None  # HW map drawn over the image (signed: red positive, blue negative)
    box: Sequence[int] | None = None  # (x0, y0, x1, y1) inclusive, drawn as a rectangle
    color: str | None = None  # frame colour
    box2: Sequence[int] | None = None  # a second box (e.g. predicted vs ground truth)


def _draw(ax, panel: Panel) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if panel.image is None:
        ax.axis("off")
        return
    ax.imshow(panel.image, cmap="gray" if panel.image.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    if panel.overlay is not None:
        m = float(np.abs(panel.overlay).max()) or 1.0
        if panel.overlay.min() >= 0:  # importance: red, opaque where important, the image visible elsewhere
            rgba = np.zeros((*panel.overlay.shape, 4))
            rgba[..., 0] = 1.0
            rgba[..., 3] = 0.85 * np.sqrt(panel.overlay / m)
            ax.imshow(rgba, interpolation="nearest")
        else:  # signed maps: red positive, blue negative
            ax.imshow(panel.overlay, cmap="bwr", vmin=-m, vmax=m, alpha=0.55, interpolation="nearest")
    for box, colour in ((panel.box, "lime"), (panel.box2, "yellow")):
        if box is not None:
            x0, y0, x1, y1 = box
            ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, color=colour, lw=1.5))
    if panel.color:
        for spine in ax.spines.values():
            spine.set_color(panel.color)
            spine.set_linewidth(3)
    ax.set_title(panel.title, fontsize=7)


def panel_grid(rows: list[list[Panel]], path: str | Path, *, title: str | None = None, row_labels: list[str] | None = None,
               cell: float = 1.35) -> Path:
    """Save a grid of panels (rows may differ in length) as a PNG."""
    ncols = max(len(r) for r in rows)
    # room above every row for its captions (two lines at 7 pt), so a caption never covers the image above it
    lines = [max((p.title.count("\n") + 1 if p.title else 0) for p in r) for r in rows]
    height = sum(cell + 0.14 * n for n in lines) + (0.35 if title else 0.1) * (title.count("\n") + 1 if title else 1)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(cell * ncols + 0.6, height), squeeze=False,
                             gridspec_kw={"height_ratios": [cell + 0.14 * n for n in lines]})
    for r, row in enumerate(rows):
        for c in range(ncols):
            _draw(axes[r][c], row[c] if c < len(row) else Panel(None))
        if row_labels:
            axes[r][0].set_ylabel(row_labels[r], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def save_thumbnail(pixels: torch.Tensor, path: str | Path, size: int = 96) -> Path:
    """An upscaled (nearest-neighbour) PNG of one uint8 [C, H, W] image."""
    img = pixels.detach().cpu()
    arr = img.permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    scale = max(1, size // max(arr.shape[0], arr.shape[1]))
    pil = pil.resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)
    return save_with(path, lambda tmp: pil.save(tmp, format="PNG"))
