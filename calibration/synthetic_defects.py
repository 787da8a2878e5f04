"""Synthetic defects painted on good images, with exact masks.

Why: a post-network setting such as the anomaly-map smoothing changes image and pixel
accuracy, and a quality engineer usually has no labelled defect images when training
(and choosing on the test split flatters the choice). Painting defects on held-out good
images gives a labelled set from the good images alone. It is a proxy: real defects
differ, so it is for choosing among a few settings, not for reporting accuracy.

Three families, cycled so every set holds all of them:

- ``patch``: texture from elsewhere in the same image (rotated, colour-shifted) inside an
  irregular blob: a foreign structure (broken part, misplaced piece).
- ``stain``: a colour/brightness change inside a blob, partly transparent: contamination.
- ``scratch``: a thin polyline, dark or bright.

numpy + OpenCV only (no torch), seeded and deterministic.
"""
from __future__ import annotations

import numpy as np

FAMILIES = ("patch", "stain", "scratch")
MIN_AREA_FRACTION = 0.0005  # a mask smaller than this is drawn again (a few pixels score as noise)


def _blob_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Irregular blob: a rotated ellipse whose edge is pushed around by smooth noise."""
    import cv2

    s = min(h, w)
    cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
    ry, rx = rng.uniform(0.02, 0.10, size=2) * s
    a = rng.uniform(0.0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
    v = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
    d = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    noise = cv2.resize(rng.standard_normal((6, 6)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    return d + 0.3 * noise < 1.0


def _scratch_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A polyline of 2-4 segments, 10-40 % of the image long, 1-3 px thick at 256 px."""
    import cv2

    s = min(h, w)
    n = int(rng.integers(3, 6))
    length = rng.uniform(0.10, 0.40) * s
    p = np.array([rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h])
    heading = rng.uniform(0, 2 * np.pi)
    pts = [p.copy()]
    for _ in range(n - 1):
        heading += rng.uniform(-0.6, 0.6)
        p = p + length / (n - 1) * np.array([np.cos(heading), np.sin(heading)])
        pts.append(p.copy())
    mask = np.zeros((h, w), np.uint8)
    thickness = max(1, int(round(rng.uniform(1.0, 3.0) * s / 256)))
    cv2.polylines(mask, [np.round(np.array(pts)).astype(np.int32)], False, 1, thickness, cv2.LINE_8)
    return mask.astype(bool)


def _paint(rng: np.random.Generator, img: np.ndarray, family: str) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    for _ in range(20):  # draw again until the mask is big enough and inside the image
        mask = _scratch_mask(rng, h, w) if family == "scratch" else _blob_mask(rng, h, w)
        if mask.mean() >= MIN_AREA_FRACTION:
            break
    f = img.astype(np.float32)
    if family == "patch":
        src = np.rot90(f, int(rng.integers(1, 4)))
        src = np.ascontiguousarray(src) if src.shape[:2] == (h, w) else np.ascontiguousarray(np.flip(f, axis=0))
        src = np.roll(src, (int(rng.integers(h // 4, 3 * h // 4)), int(rng.integers(w // 4, 3 * w // 4))), axis=(0, 1))
        src = np.clip(src * rng.uniform(0.7, 1.3, size=3), 0, 255)
        alpha = rng.uniform(0.6, 1.0)
    elif family == "stain":
        src = np.broadcast_to(rng.uniform(0, 255, size=3).astype(np.float32), f.shape)
        alpha = rng.uniform(0.3, 0.8)
    else:
        level = rng.uniform(0, 60) if rng.random() < 0.5 else rng.uniform(190, 255)
        src = np.full_like(f, level)
        alpha = rng.uniform(0.7, 1.0)
    m = mask[..., None].astype(np.float32) * alpha
    out = f * (1 - m) + src * m
    return np.clip(np.round(out), 0, 255).astype(np.uint8), mask


def paint_defects(frames: np.ndarray, per_image: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """uint8 [N,H,W,3] good frames -> (defect frames [N*per_image,H,W,3], masks uint8 {0,1} [N*per_image,H,W],
    family of each). Frame i's copies come first, then frame i+1's; families cycle."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"paint_defects takes uint8 [N,H,W,3] frames, got {frames.dtype} {tuple(frames.shape)}")
    if per_image < 1:
        raise ValueError(f"per_image must be at least 1, got {per_image}")
    rng = np.random.default_rng(seed)
    n, h, w, _ = frames.shape
    out = np.empty((n * per_image, h, w, 3), np.uint8)
    masks = np.empty((n * per_image, h, w), np.uint8)
    families = []
    for k in range(n * per_image):
        family = FAMILIES[k % len(FAMILIES)]
        out[k], mask = _paint(rng, frames[k // per_image], family)
        masks[k] = mask
        families.append(family)
    return out, masks, families
