"""Does a product have a layout? The share of its patch-feature variance that is tied to the position.

PUAD's Gaussian score on the image-mean feature sees logical anomalies (a part missing, doubled or of the
wrong kind) that a per-patch score cannot, on products whose good images share a layout: a part in a fixture,
a tray, a board. On a texture (fabric, a surface, a natural material) every position looks alike, the mean
feature measures only how the texture varies across the material, and good samples from another stretch of it
leave the Gaussian of the training images (measured: real photo textures grass and brick lost image AUROC with
it, every product with a layout gained; docs/memory_bank.md). A family whose Gaussian follows the layout
(``family_params["gaussian"]["switch"] == "layout"``) has it turned on by calibration only when this fraction
reaches ``LAYOUT_MIN``; training and every field refit decide it the same way, from the good images alone.

The fraction, from patch features: a margin of ``MARGIN`` of each side cut off, the rest averaged over a
``CELLS`` x ``CELLS`` grid of cells (a layout lives at the scale of parts, not of single patches); the variance of
the cells' means over the images (less its sampling noise) is how much the positions differ. Part of that is the
backbone's own: zero padding makes a CNN's features depend on where they are in every image, textures included
(0.04-0.05 of the variance at 384 px, 0.13-0.18 at 256 px, 0.7-0.8 at 64 px on photo textures, measured). So the
same is measured on up to ``ROLLED_IMAGES`` of the images shifted circularly by random offsets (content moved,
backbone left in place) and taken away. What is left, over the total, is 0.084 at most for the 6 textures measured
and 0.123-0.963 for the 7 products, at 64, 256 and 384 px (``benchmarks.layout_share``, docs/memory_bank.md).
"""
from __future__ import annotations

import numpy as np

from .fitting import CalibrationError

MARGIN = 0.1  # of each side, in grid cells (at least one)
CELLS = 8  # cells per side the interior is averaged into (fewer when the grid is smaller)
ROLLED_IMAGES = 32  # images shifted to measure the backbone's own position signal
ROLL_SEED = 0
# From training images only: 6 textures (3 photos, 3 generated) <= 0.084, 7 products >= 0.123 at 64, 256 and
# 384 px (<= 0.020 and >= 0.123 at the 384 px default; docs/memory_bank.md); the threshold sits between the groups
LAYOUT_MIN = 0.1


def _cell_means(f: np.ndarray, axis: int, cells: int) -> np.ndarray:
    bounds = np.linspace(0, f.shape[axis], cells + 1).round().astype(int)
    return np.stack([f.take(np.arange(a, b), axis=axis).mean(axis=axis) for a, b in zip(bounds[:-1], bounds[1:])],
                    axis=axis)


def layout_cells(patch_features: np.ndarray) -> np.ndarray:
    """patch features [N,C,h,w] -> the interior averaged over cells [N,C,ch,cw] (float64): small enough to keep."""
    f = np.asarray(patch_features)
    if f.ndim != 4 or min(f.shape) < 1:
        raise CalibrationError(f"patch features of shape {list(f.shape)}: expected [images, channels, h, w]")
    h, w = f.shape[2:]
    mh, mw = (max(1, round(s * MARGIN)) if s > 2 else 0 for s in (h, w))
    inner = f[:, :, mh:h - mh, mw:w - mw].astype(np.float64)
    inner = _cell_means(inner, 2, min(CELLS, inner.shape[2]))
    return _cell_means(inner, 3, min(CELLS, inner.shape[3]))


def rolled_frames(frames: np.ndarray) -> np.ndarray:
    """The first ``ROLLED_IMAGES`` frames [N,H,W,C] (as the graph takes them), each shifted circularly by a
    seeded random offset: the same content nowhere in particular, for ``layout_fraction``."""
    rng = np.random.default_rng(ROLL_SEED)
    out = [np.roll(f, (int(rng.integers(f.shape[0])), int(rng.integers(f.shape[1]))), axis=(0, 1))
           for f in np.asarray(frames)[:ROLLED_IMAGES]]
    if len(out) < 2:
        raise CalibrationError(f"{len(out)} image(s) cannot tell a layout from a texture: give at least 2")
    return np.stack(out)


def position_spread(cells: np.ndarray) -> tuple[float, float]:
    """(how the cell means differ between positions, less their sampling noise; how images differ at a position)."""
    c = np.asarray(cells, np.float64)
    n = len(c)
    if n < 2:
        raise CalibrationError(f"{n} image(s) cannot tell a layout from a texture: give at least 2")
    at_position = c.mean(0)  # [C,ch,cw]
    overall = at_position.mean(axis=(1, 2), keepdims=True)
    within = float(((c - at_position) ** 2).sum(1).mean())
    between = float(((at_position - overall) ** 2).sum(0).mean())
    return between - within / (n - 1), within


def layout_fraction(cells: np.ndarray, rolled_cells: np.ndarray) -> float:
    """``layout_cells`` of N >= 2 good images and of their ``rolled_frames`` -> the share of the variance tied to
    the position in the product, the backbone's own position signal taken away, in [0, 1]."""
    between, within = position_spread(cells)
    backbone, _ = position_spread(rolled_cells)
    product = max(between - max(backbone, 0.0), 0.0)
    return float(product / (product + within)) if product + within > 0 else 0.0


def has_layout(fraction: float) -> bool:
    return fraction >= LAYOUT_MIN


def gaussian_switch(family_params: dict | None) -> str:
    """How a graph's Gaussian score is switched: ``"always"`` on, or by ``"layout"`` (see the module docstring)."""
    switch = ((family_params or {}).get("gaussian") or {}).get("switch", "always")
    if switch not in ("always", "layout"):
        raise CalibrationError(f"gaussian switch {switch!r} in the sidecar: this edgead knows 'always' and 'layout'; "
                               "upgrade edgead")
    return switch
