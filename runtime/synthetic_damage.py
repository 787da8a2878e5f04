"""Defects painted onto a rendered good image, each with an exact mask.

Why a separate module: the multi-class generator (``runtime.synthetic_classes``) paints
the same kinds of damage on objects, procedural textures and real texture tiles. Every
painter returns a *target* image and an *alpha* map; ``blend`` mixes them into the good
image so that exactly the pixels with ``alpha > 0`` can change, and the ground-truth mask
is that set. A painter never touches a pixel outside its mask.

Images here are float32 HxWx3 BGR in [0, 255]; alpha is float32 HxW in [0, 1]; ``roi``
(where a defect may start: the part, not the background) is bool HxW or None.
numpy + OpenCV only (the runtime's demo may use it).
"""
from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

ALPHA_FLOOR = 0.12  # alpha below this is dropped: an invisible fringe is neither damage nor ground truth
MIN_AREA_PX = 12  # a mask smaller than this (at any image size) is drawn again


def smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Band-limited noise, float32 [h, w], about unit variance; ``cell`` = feature size in px."""
    gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
    g = rng.standard_normal((gh, gw)).astype(np.float32)
    return cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)


def fbm(rng: np.random.Generator, h: int, w: int, cell: float, octaves: int = 4, gain: float = 0.5) -> np.ndarray:
    """Fractal noise: ``octaves`` layers of smooth_noise, each half the cell and ``gain`` the amplitude."""
    out = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    for _ in range(octaves):
        out += amp * smooth_noise(rng, h, w, max(1.0, cell))
        total += amp
        amp *= gain
        cell /= 2
    return out / total


def pick_point(rng: np.random.Generator, h: int, w: int, roi: np.ndarray | None, margin: float = 0.1) -> tuple[float, float]:
    """A random (x, y) inside ``roi`` (or inside the image, ``margin`` of the size away from the edge)."""
    if roi is not None and roi.any():
        ys, xs = np.nonzero(roi)
        k = int(rng.integers(len(xs)))
        return float(xs[k]), float(ys[k])
    return float(rng.uniform(margin, 1 - margin) * w), float(rng.uniform(margin, 1 - margin) * h)


def blob_alpha(rng: np.random.Generator, h: int, w: int, centre: tuple[float, float], radius: float,
               elongation: float = 1.6, roughness: float = 0.35, edge_px: float = 1.0) -> np.ndarray:
    """Irregular blob around ``centre``: a rotated ellipse with a noisy edge, soft by ``edge_px``."""
    cx, cy = centre
    rx = radius * rng.uniform(1.0, elongation)
    ry = radius * rng.uniform(1.0 / elongation, 1.0)
    a = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
    v = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
    d = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    d = d + roughness * smooth_noise(rng, h, w, max(2.0, radius / 1.5))
    # signed distance in px to the edge (approximate), mapped to a soft edge
    return np.clip((1.0 - d) * radius / max(edge_px, 1e-3) + 0.5, 0, 1).astype(np.float32)


def _path(rng: np.random.Generator, start: tuple[float, float], length: float, n: int, turn: float,
          heading: float | None = None) -> np.ndarray:
    p = np.array(start, np.float64)
    h = rng.uniform(0, 2 * np.pi) if heading is None else heading
    pts = [p.copy()]
    for _ in range(n):
        h += rng.uniform(-turn, turn)
        p = p + length / n * np.array([np.cos(h), np.sin(h)])
        pts.append(p.copy())
    return np.array(pts)


def line_alpha(h: int, w: int, pts: np.ndarray, thickness: float) -> np.ndarray:
    """Anti-aliased polyline coverage in [0, 1]; drawn at 4x and reduced, so sub-pixel widths work."""
    k = 4
    canvas = np.zeros((h * k, w * k), np.uint8)
    p = np.round(pts * k * 16).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(canvas, [p], False, 255, max(1, int(round(thickness * k))), cv2.LINE_AA, shift=4)
    return cv2.resize(canvas, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def blend(good: np.ndarray, target: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """good, target float [H,W,3]; alpha float [H,W] -> (image float [H,W,3], mask bool [H,W]).

    Alpha below ALPHA_FLOOR is set to 0, so the mask (alpha > 0) holds every changed pixel.
    """
    a = np.where(alpha >= ALPHA_FLOOR, alpha, 0).astype(np.float32)
    out = good * (1 - a[..., None]) + target * a[..., None]
    return out, a > 0


# ----------------------------------------------------------------------------- painters
# Each painter: (rng, good float [H,W,3], roi bool [H,W] | None, scale) -> (target, alpha).
# ``scale`` is the image size / 256, so a defect has the same look at every resolution.

def scratch(rng, good, roi, scale):
    """A thin, slightly curved line, brighter (scraped metal, lighter fibres) or darker than the surface."""
    h, w = good.shape[:2]
    heading = None
    if roi is not None and roi.any():  # along the part's long axis (a screw is scraped lengthwise), +-20 degrees
        m = cv2.moments(roi.astype(np.uint8), binaryImage=True)
        axis = 0.5 * np.arctan2(2 * m["mu11"], m["mu20"] - m["mu02"])
        heading = axis + rng.uniform(-0.35, 0.35) + np.pi * int(rng.integers(2))
    pts = _path(rng, pick_point(rng, h, w, roi), rng.uniform(0.08, 0.22) * 256 * scale, 6, 0.15, heading)
    alpha = line_alpha(h, w, pts, rng.uniform(1.2, 2.4) * scale) * rng.uniform(0.55, 0.9)
    shift = rng.uniform(45, 90) * (1 if rng.random() < 0.6 else -1)
    return np.clip(good + shift, 0, 255), alpha


def crack(rng, good, roi, scale, heading: float | None = None):
    """A jagged dark line with a short branch: the surface split open."""
    h, w = good.shape[:2]
    start = pick_point(rng, h, w, roi)
    length = rng.uniform(0.10, 0.22) * 256 * scale
    main = _path(rng, start, length, 9, 0.9 if heading is None else 0.5, heading)
    alpha = line_alpha(h, w, main, rng.uniform(1.3, 2.6) * scale)
    k = int(rng.integers(2, len(main) - 2))
    branch = _path(rng, tuple(main[k]), length * rng.uniform(0.25, 0.45), 4, 0.9)
    alpha = np.maximum(alpha, line_alpha(h, w, branch, 1.0 * scale))
    alpha = alpha * rng.uniform(0.7, 0.95)
    return good * rng.uniform(0.15, 0.35), alpha


def hole(rng, good, roi, scale, behind: tuple[float, float, float] | None = None):
    """A small round-ish opening showing what lies behind (dark by default), with a faint bright rim."""
    h, w = good.shape[:2]
    c = pick_point(rng, h, w, roi)
    r = rng.uniform(3.0, 7.0) * scale
    core = blob_alpha(rng, h, w, c, r, elongation=1.3, roughness=0.2)
    rim = np.clip(blob_alpha(rng, h, w, c, r * 1.45, elongation=1.0, roughness=0.15) - core, 0, 1)
    colour = np.array(behind if behind is not None else rng.uniform(10, 35, 3), np.float32)
    target = np.where(core[..., None] > 0, colour, np.clip(good * 1.25 + 10, 0, 255))
    alpha = np.maximum(core, 0.45 * rim)
    return target.astype(np.float32), alpha


def contamination(rng, good, roi, scale):
    """Foreign matter (dust clump, oil, fibre ball): a textured blob of a colour that is not the surface's."""
    h, w = good.shape[:2]
    c = pick_point(rng, h, w, roi)
    r = rng.uniform(4.0, 10.0) * scale
    alpha = blob_alpha(rng, h, w, c, r, roughness=0.45) * rng.uniform(0.55, 0.9)
    base = rng.uniform(20, 200, 3).astype(np.float32)
    tex = fbm(rng, h, w, max(2.0, 3 * scale), 3)[..., None] * 18
    return np.clip(base + tex, 0, 255).astype(np.float32), alpha


def colour(rng, good, roi, scale, tint: tuple[float, float, float] | None = None):
    """Discolouration (burn, rust, faded dye): the surface stays, its colour shifts in a soft patch.

    ``tint``: per-channel BGR gain of a known discolouration (rust: blue down, red up); default random."""
    h, w = good.shape[:2]
    c = pick_point(rng, h, w, roi)
    r = rng.uniform(7.0, 16.0) * scale
    alpha = blob_alpha(rng, h, w, c, r, roughness=0.3, edge_px=3 * scale)
    if tint is None:
        gain = 1 + rng.uniform(0.18, 0.35) * rng.choice([-1, 1], 3)
    else:
        gain = 1 + (np.asarray(tint, np.float64) - 1) * rng.uniform(0.7, 1.2)
    return np.clip(good * gain.astype(np.float32), 0, 255), alpha


def stain(rng, good, roi, scale):
    """A dried liquid: darker patch, darkest at its rim (coffee-ring), the surface visible through it."""
    h, w = good.shape[:2]
    c = pick_point(rng, h, w, roi)
    r = rng.uniform(6.0, 14.0) * scale
    inner = blob_alpha(rng, h, w, c, r, roughness=0.3, edge_px=2 * scale)
    ring = np.clip(inner - cv2.erode(inner, np.ones((3, 3), np.uint8), iterations=max(1, int(2 * scale))), 0, 1)
    alpha = np.clip(0.55 * inner + 0.4 * ring, 0, 1)
    return good * rng.uniform(0.45, 0.65), alpha


def fold(rng, good, roi, scale):
    """A crease: a long soft line, dark on one side and light on the other (leather, fabric)."""
    h, w = good.shape[:2]
    pts = _path(rng, pick_point(rng, h, w, roi), rng.uniform(0.2, 0.4) * 256 * scale, 5, 0.15)
    width = rng.uniform(2.5, 4.5) * scale
    a = line_alpha(h, w, pts, width * 2)
    off = np.array([1.0, 1.0]) * width * 0.6
    dark = line_alpha(h, w, pts + off, width)
    alpha = np.clip(a * 0.75, 0, 1)
    target = np.clip(good * (1.35 - 0.7 * dark[..., None]), 0, 255)
    return target.astype(np.float32), alpha


SURFACE = ("scratch", "crack", "colour", "stain", "fold")  # kinds that change the part's own surface
PAINTERS: dict[str, Callable] = {"scratch": scratch, "crack": crack, "hole": hole, "contamination": contamination,
                                 "colour": colour, "stain": stain, "fold": fold}


def paint(rng: np.random.Generator, good: np.ndarray, kind: str, roi: np.ndarray | None = None,
          size: float = 1.0, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Paint one ``kind`` defect on float ``good`` [H,W,3] -> (image float [H,W,3], mask bool [H,W]).

    ``size`` multiplies the defect's dimensions (1 = sized for a 256 px image of a part);
    ``kwargs`` go to the painter.

    Drawn again (up to 20 times) until the mask has at least MIN_AREA_PX pixels and, when ``roi``
    is given, at least half of it lies on the roi.
    """
    if kind not in PAINTERS:
        raise ValueError(f"unknown painted defect {kind!r}; choose from {', '.join(PAINTERS)}")
    scale = max(max(good.shape[:2]) / 256.0, 0.25) * size
    for _ in range(20):
        target, alpha = PAINTERS[kind](rng, good, roi, scale, **kwargs)
        drawn = alpha >= ALPHA_FLOOR
        if roi is not None and kind in SURFACE:
            alpha = alpha * roi  # surface damage stays on the part; contamination may overhang it
        out, mask = blend(good, target, alpha)
        if mask.sum() >= MIN_AREA_PX and (roi is None or (drawn & roi).sum() >= 0.5 * drawn.sum()):
            break
    return out, mask


def mask_from_difference(good: np.ndarray, changed: np.ndarray, threshold: float = 6.0) -> np.ndarray:
    """Ground truth of a re-rendered defect (a part missing, bent, added): pixels that differ by more than
    ``threshold`` grey levels, closed over 3 px so a region is one region. bool [H,W]."""
    diff = np.abs(changed.astype(np.float32) - good.astype(np.float32)).max(axis=-1) > threshold
    m = cv2.morphologyEx(diff.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    return m > 0
