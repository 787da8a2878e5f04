"""Where a feature grid really sees: the offset between a grid cell and the input pixels it describes.

A map drawn with the half-pixel convention puts cell ``i`` at input px ``s*i + s/2`` (``s`` = stride). A
CNN trunk with symmetric padding reads each cell from above-left of that point (each stride-2 layer moves
its outputs half an input step up-left, and the trained weights add to it): measured on the frozen
EfficientNet-Lite2 stages 0-3 at stride 16, a small defect's response lands about 11 px below and 10 px
right of the defect at 256 px (benchmarks/README.md, "Where the map is drawn"). Pixel-level localization
metrics pay for that. The offset depends on the weights (random ones measure ~3 px), so it is measured per
model, not computed from the architecture.

``measure_grid_offset`` paints small dots at known pixels on deterministic generated images (no data, no
download) and returns the mean (dy, dx) in input px by which the response's centroid on the grid lies
past the dot; the deploy head moves the upsampled map back by it (``DeployHead.map_offset_px``).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable, Iterator

import cv2
import numpy as np
import torch

log = logging.getLogger(__name__)

DOT = 6  # dot side, px: smaller than one cell of any grid the families use
COLOURS = ((255, 0, 255), (255, 255, 255), (0, 0, 0), (0, 255, 255))  # a dot of each colour at every place


def probe_images(image_size: tuple[int, int], n: int = 2, seed: int = 0) -> np.ndarray:
    """``n`` deterministic uint8 [n,H,W,3] images of smooth colour noise (a textured, dot-free background)."""
    h, w = image_size
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        noise = rng.normal(0, 1, (h, w, 3)).astype(np.float32)
        smooth = cv2.GaussianBlur(noise, (0, 0), max(h, w) / 64)
        smooth = (smooth - smooth.mean()) / (smooth.std() + 1e-6)
        out.append(np.clip(128 + 40 * smooth, 0, 255).astype(np.uint8))
    return np.stack(out)


def dot_places(image_size: tuple[int, int], step: int = 4) -> list[tuple[int, int]]:
    """Dot centres (y, x) on a diagonal through the middle half of the image, ``step`` px apart: every
    phase of the grid, far from the borders (whose padding would pull the response inward)."""
    h, w = image_size
    n = max(2, min(h, w) // (2 * step))
    return [(int(round(h / 4 + i * (h / 2) / n)), int(round(w / 4 + i * (w / 2) / n))) for i in range(n)]


@torch.no_grad()
def measure_grid_offset(features: Callable[[torch.Tensor], torch.Tensor], preprocess: Callable[[torch.Tensor], torch.Tensor],
                        image_size: tuple[int, int], device: str = "cpu", batch: int = 16) -> tuple[float, float] | None:
    """Mean (dy, dx), input px, from each painted dot to the centroid of its response on the feature grid.

    ``features``: preprocessed [N,3,H,W] -> [N,C,h,w] (the grid the family's map lives on); ``preprocess``:
    uint8 [N,H,W,3] frames -> its input. Response = per-channel standardized squared feature change; its
    centroid over the 5 x 5 cells around its peak, a cell drawn at its half-pixel centre. None when ``features``
    returns None (a model without a feature grid to measure)."""
    h, w = image_size
    base = probe_images(image_size)

    def run(frames: np.ndarray) -> torch.Tensor | None:
        f = features(preprocess(torch.from_numpy(frames).to(device)))
        return None if f is None else f.float().cpu()

    f0 = run(base)
    if f0 is None:
        return None
    std = f0.std(dim=(0, 2, 3), keepdim=True) + 1e-6
    gh, gw = f0.shape[-2:]
    sy, sx = h / gh, w / gw
    r = DOT // 2
    jobs = []
    for k, (py, px) in enumerate(dot_places(image_size)):
        for i in range(len(base)):
            img = base[i].copy()
            img[py - r:py + r, px - r:px + r] = COLOURS[(k + i) % len(COLOURS)]
            jobs.append((i, py, px, img))
    errs = []
    for j in range(0, len(jobs), batch):
        chunk = jobs[j:j + batch]
        f = run(np.stack([c[3] for c in chunk]))
        idx = torch.tensor([c[0] for c in chunk])
        resp = (((f - f0[idx]) / std) ** 2).sum(1).numpy()  # [B,h,w]
        for m, (_, py, px, _) in zip(resp, chunk):
            iy, ix = np.unravel_index(int(m.argmax()), m.shape)
            y0, y1, x0, x1 = max(iy - 2, 0), min(iy + 3, gh), max(ix - 2, 0), min(ix + 3, gw)
            win = m[y0:y1, x0:x1]
            gy, gx = np.mgrid[y0:y1, x0:x1]
            errs.append(((win * (gy + 0.5)).sum() / win.sum() * sy - py, (win * (gx + 0.5)).sum() / win.sum() * sx - px))
    e = np.asarray(errs)
    dy, dx = float(e[:, 0].mean()), float(e[:, 1].mean())
    log.info("grid offset: a defect's response lies %.1f px below, %.1f px right of it (%d dots, sd %.1f / %.1f px)",
             dy, dx, len(e), e[:, 0].std(), e[:, 1].std())
    return dy, dx


def apply_grid_offset(model, device: str = "cpu") -> dict:
    """Before training: measure the offset of a model whose config leaves it open (``map_offset_px`` None) on
    its ``grid_features`` and set it (kept in the config, so in the checkpoint). JSON-able facts."""
    if model.cfg.map_offset_px is not None:
        return {"map_offset_px": list(model.cfg.map_offset_px), "how": "given"}
    was_training = model.training
    model.eval()
    try:
        offset = measure_grid_offset(model.grid_features, model.preprocess, model.cfg.image_size, device)
    finally:
        model.train(was_training)
    if offset is None:
        model.set_map_offset((0.0, 0.0))
        return {"map_offset_px": [0.0, 0.0], "how": "no feature grid to measure (the model's grid_features is None)"}
    model.set_map_offset(offset)
    return {"map_offset_px": list(model.cfg.map_offset_px), "how": "measured (train.geometry)"}


@contextmanager
def drawn_at(model, map_offset_px) -> Iterator[None]:
    """The model's map drawn at another offset while the block runs (e.g. (0, 0): what its offset is worth on the
    same trained model); its own offset, in the head and the config, comes back afterwards."""
    kept_cfg, kept = model.cfg.map_offset_px, model.head.map_offset_px
    model.set_map_offset(map_offset_px)
    try:
        yield
    finally:
        model.head.set_offset(kept)
        model.cfg.map_offset_px = kept_cfg
