"""The embedded default dataset: coloured geometric shapes on cluttered, textured backgrounds.

Generated deterministically from a seed by code (no files, no downloads).  Each RGB image holds exactly one
object of one of five classes — disc, square, triangle, cross, ring — with random position, size, rotation and
colour, drawn over a smooth random colour field with a sinusoidal texture, pixel noise and clutter (random line
segments and blobs in random colours).  Colour carries no class information; shape does.  Every image carries
the ground-truth bounding box of its object, ``(x0, y0, x1, y1)`` inclusive pixel coordinates, computed from
the object's own pixel mask, so the box covers exactly the object's pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

CLASSES = ("disc", "square", "triangle", "cross", "ring")
# Normalisation of the generator's images (per-channel mean and std of 20,000 generated images, rounded).
MEAN = (0.5, 0.5, 0.5)
STD = (0.22, 0.22, 0.22)


@dataclass
class ShapesSplit:
    images: torch.Tensor  # uint8 [n, 3, size, size]
    labels: torch.Tensor  # int64 [n]
    boxes: torch.Tensor  # int64 [n, 4] (x0, y0, x1, y1), inclusive
    masks: torch.Tensor  # bool [n, size, size], the object's pixels


def object_mask(label: int, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Boolean [size, size] mask of a shape of class ``label`` centred at (cx, cy) with outer radius r."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy = xs - cx, ys - cy
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    name = CLASSES[label]
    if name == "disc":
        return dx**2 + dy**2 <= r**2
    if name == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if name == "square":
        a = 0.78 * r
        return (np.abs(u) <= a) & (np.abs(v) <= a)
    if name == "triangle":
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):  # equilateral, circumradius r, inradius r/2: three half-planes
            phi = angle + 2 * np.pi * k / 3 + np.pi
            inside &= dx * np.cos(phi) + dy * np.sin(phi) <= 0.5 * r
        return inside
    if name == "cross":
        w = 0.3 * r
        return ((np.abs(u) <= w) & (np.abs(v) <= r)) | ((np.abs(v) <= w) & (np.abs(u) <= r))
    raise ValueError(label)


def _background(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Smooth random colour fields plus a sinusoidal texture and pixel noise, float [n, 3, size, size]."""
    coarse = torch.from_numpy(rng.uniform(0.1, 0.9, size=(n, 3, 4, 4)).astype(np.float32))
    field = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True).numpy()
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    freq = rng.uniform(0.3, 1.2, size=(n, 1, 1, 1)).astype(np.float32)
    theta = rng.uniform(0, np.pi, size=(n, 1, 1, 1)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1, 1)).astype(np.float32)
    texture = np.sin(freq * (np.cos(theta) * xs + np.sin(theta) * ys) + phase)
    field += 0.08 * texture + rng.normal(0, 0.04, size=field.shape).astype(np.float32)
    return field


def _draw_clutter(rng: np.random.Generator, img: np.ndarray) -> None:
    size = img.shape[-1]
    for _ in range(rng.integers(3, 7)):  # line segments
        x0, y0, x1, y1 = rng.uniform(0, size, size=4)
        t = np.linspace(0, 1, 2 * size)
        xs = np.clip((x0 + t * (x1 - x0)).astype(int), 0, size - 1)
        ys = np.clip((y0 + t * (y1 - y0)).astype(int), 0, size - 1)
        img[:, ys, xs] = rng.uniform(0, 1, size=(3, 1))
    for _ in range(rng.integers(2, 5)):  # small blobs
        x, y = rng.integers(0, size - 2, size=2)
        img[:, y : y + 2, x : x + 2] = rng.uniform(0, 1, size=(3, 1, 1))


def generate(n: int, *, size: int = 32, seed: int = 0, stream: int = 0) -> ShapesSplit:
    """Generate ``n`` images; (seed, stream) fixes the result bit for bit (train and test use other streams)."""
    if size < 16:
        raise ValueError("shapes images must be at least 16x16")
    rng = np.random.default_rng([seed, stream])
    labels = rng.integers(0, len(CLASSES), size=n)
    images = _background(rng, n, size)
    boxes = np.zeros((n, 4), dtype=np.int64)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        img = images[i]
        _draw_clutter(rng, img)
        r = rng.uniform(0.2, 0.34) * size
        cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
        mask = object_mask(int(labels[i]), size, cx, cy, r, rng.uniform(0, 2 * np.pi))
        local = img[:, mask].mean(axis=1)
        colour = rng.uniform(0, 1, size=3)
        while np.abs(colour - local).mean() < 0.3:  # keep the object visible against its background
            colour = rng.uniform(0, 1, size=3)
        shade = 1.0 + rng.normal(0, 0.03, size=(1, int(mask.sum())))
        img[:, mask] = colour[:, None] * shade
        masks[i] = mask
        ys, xs = np.nonzero(mask)
        boxes[i] = (xs.min(), ys.min(), xs.max(), ys.max())
    pixels = np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)
    return ShapesSplit(torch.from_numpy(pixels), torch.from_numpy(labels.astype(np.int64)), torch.from_numpy(boxes),
                       torch.from_numpy(masks))
