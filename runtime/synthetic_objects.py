"""Procedural objects for the multi-class benchmark: a screw in any orientation, a pin-header connector strip.

Like the textures, each object is a pure function of parameters drawn from a seeded
generator, so a missing, bent or added part is the same scene rendered again with one
change; its mask is the difference. Every render returns (float32 BGR [H,W,3] in
[0, 255], roi bool [H,W] = where the part is, where surface damage may start).
numpy + OpenCV only.
"""
from __future__ import annotations

import cv2
import numpy as np

from .synthetic_damage import fbm

# ----------------------------------------------------------------------------- screw (free rotation)


def sample_screw(rng: np.random.Generator, h: int, w: int) -> dict:
    """A machine screw lying on a light plate: any angle, centre within 6 % of the middle, length 52-60 %."""
    s = min(h, w)
    length = rng.uniform(0.52, 0.60) * s
    return {"h": h, "w": w, "angle": rng.uniform(0, 2 * np.pi), "length": length,
            "centre": (w / 2 + rng.uniform(-0.06, 0.06) * s, h / 2 + rng.uniform(-0.06, 0.06) * s),
            "pitch": length * rng.uniform(0.055, 0.065), "thread_phase": rng.uniform(0, 1),
            "metal": rng.uniform(95, 120), "plate": rng.uniform(170, 195), "plate_noise": fbm(rng, h, w, 20, 3),
            "tip_cut": 0.0, "stripped": None}


def _screw_fields(p: dict) -> tuple[np.ndarray, ...]:
    h, w = p["h"], p["w"]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = p["centre"]
    L = p["length"]
    c, s = np.cos(p["angle"]), np.sin(p["angle"])
    a = (xx - cx) * c + (yy - cy) * s + L / 2  # along the axis, 0 at the head's top
    b = -(xx - cx) * s + (yy - cy) * c  # across the axis
    return a, b, L


def render_screw(p: dict) -> tuple[np.ndarray, np.ndarray]:
    """Side view: round head, threaded shank with a serrated outline and slanted crests, pointed tip."""
    a, b, L = _screw_fields(p)
    head_len, head_r, shank_r, tip_len = 0.17 * L, 0.11 * L, 0.058 * L, 0.12 * L
    pitch = p["pitch"]
    phase = (a + 0.35 * b) / pitch + p["thread_phase"]
    tooth = np.abs((phase % 1.0) - 0.5) * 2  # 1 at a crest, 0 at a root
    depth = 0.22 * shank_r
    end = L - p["tip_cut"]
    worn = np.zeros_like(a, dtype=bool)
    if p["stripped"] is not None:
        a0, a1 = p["stripped"]
        worn = (a >= a0) & (a <= a1)
    half = np.where(worn, shank_r - depth, shank_r - depth + depth * tooth)
    taper = np.clip((L - a) / tip_len, 0.15, 1.0)
    half = half * np.where(a > L - tip_len, taper, 1.0)
    shank_in = np.minimum(half - np.abs(b), np.minimum(a - head_len + 1, end - a))
    # head: rounded top (an ellipse in a) and flat underside
    head_in = np.minimum(head_r * np.sqrt(np.clip(1 - ((head_len - a) / head_len) ** 2 * 0.55, 0, 1)) - np.abs(b),
                         np.minimum(a, head_len - a))
    cov_shank = np.clip(shank_in + 0.5, 0, 1)
    cov_head = np.clip(head_in + 0.5, 0, 1)
    cov = np.maximum(cov_shank, cov_head)
    # metal shading: cylinder highlight across the axis, crests brighter than roots
    across_s = np.clip(b / np.maximum(half, 1e-3), -1, 1)
    across_h = np.clip(b / head_r, -1, 1)
    crest = np.where(worn, 0.9, 0.78 + 0.35 * tooth)
    metal = p["metal"]
    shank_val = metal * (0.55 + 0.75 * np.sqrt(1 - across_s ** 2) ** 3 + 0.25 * across_s) * crest
    head_val = metal * (0.6 + 0.7 * np.sqrt(1 - across_h ** 2) ** 2 + 0.2 * across_h) * (0.9 + 0.1 * np.clip(a / head_len, 0, 1))
    part = np.where(cov_head > cov_shank, head_val, shank_val)
    # plate with a soft shadow of the screw, offset to the lower right
    shadow = cv2.GaussianBlur(np.roll(cov, (3, 3), axis=(0, 1)), (0, 0), 3)
    plate = p["plate"] * (1 + 0.03 * p["plate_noise"]) * (1 - 0.25 * shadow)
    val = plate * (1 - cov) + part * cov
    img = np.repeat(val[..., None], 3, axis=2) * np.array([1.0, 1.0, 1.02], np.float32)  # a faint warm cast
    return np.clip(img, 0, 255).astype(np.float32), cov > 0.5


def screw_tip_cut(rng: np.random.Generator, p: dict) -> dict:
    """The tip broken off: the shank ends 8-16 % of the length early."""
    return {**p, "tip_cut": rng.uniform(0.08, 0.16) * p["length"]}


def screw_stripped(rng: np.random.Generator, p: dict) -> dict:
    """Stripped thread: 2.5-4 pitches of the shank worn smooth and slimmer."""
    L = p["length"]
    a0 = rng.uniform(0.25, 0.7) * L
    return {**p, "stripped": (a0, a0 + rng.uniform(2.5, 4.0) * p["pitch"])}


# ----------------------------------------------------------------------------- connector strip (non-square)

N_PINS = 8


def connector_shape(size: int) -> tuple[int, int]:
    """(height, width) of a connector image: a strip twice as wide as high."""
    return max(16, size // 2), size


def sample_connector(rng: np.random.Generator, h: int, w: int) -> dict:
    """A pin header on a green board strip, seen from the front: small shift, tilt and scale."""
    return {"h": h, "w": w, "angle": rng.uniform(-2.0, 2.0), "shift": (rng.uniform(-0.03, 0.03) * w, rng.uniform(-0.04, 0.04) * h),
            "scale": rng.uniform(0.97, 1.03), "pcb_noise": fbm(rng, h, w, 6, 3), "bg_noise": fbm(rng, h, w, 10, 2),
            "pin_gain": rng.uniform(0.9, 1.05, N_PINS), "gloss": rng.uniform(0.2, 0.8),
            "pcb": np.array([55, 115, 40], np.float32) * rng.uniform(0.92, 1.08), "bent": None, "missing": None,
            "bridge": None}


def _fill(img: np.ndarray, pts: np.ndarray, colour) -> None:
    """Anti-aliased filled polygon of ``colour`` (float BGR) blended into float ``img`` in place."""
    h, w = img.shape[:2]
    cov = np.zeros((h, w), np.uint8)
    cv2.fillPoly(cov, [np.round(np.asarray(pts) * 16).astype(np.int32).reshape(-1, 1, 2)], 255, cv2.LINE_AA, shift=4)
    c = cov.astype(np.float32)[..., None] / 255
    img *= 1 - c
    img += c * np.asarray(colour, np.float32)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], np.float32)


def render_connector(p: dict) -> tuple[np.ndarray, np.ndarray]:
    """Board, black housing, eight gold pins standing up, eight solder pads; then the pose (one warp)."""
    h, w = p["h"], p["w"]
    img = np.repeat((62 + 5 * p["bg_noise"])[..., None], 3, axis=2).astype(np.float32)
    pcb = _rect(0.03 * w, 0.30 * h, 0.97 * w, 0.94 * h)
    _fill(img, pcb, (0, 0, 0))
    board = np.zeros((h, w), np.uint8)
    cv2.fillPoly(board, [np.round(pcb).astype(np.int32)], 1)
    img += board[..., None] * (p["pcb"] * (1 + 0.05 * p["pcb_noise"][..., None]))
    for k in range(3):  # traces
        y = (0.84 + 0.03 * k) * h
        _fill(img, _rect(0.05 * w, y, 0.95 * w, y + 0.012 * h), p["pcb"] * 1.35)
    for x in (0.06, 0.91):  # silkscreen marks
        _fill(img, _rect(x * w, 0.35 * h, (x + 0.03) * w, 0.42 * h), (215, 215, 215))
    pitch = 0.8 * w / N_PINS
    xs = [0.1 * w + pitch * (k + 0.5) for k in range(N_PINS)]
    pad_w, pin_w = 0.55 * pitch, 0.22 * pitch
    for k, x in enumerate(xs):  # solder pads below the housing
        _fill(img, _rect(x - pad_w / 2, 0.72 * h, x + pad_w / 2, 0.80 * h), (120, 185, 210))
    if p["bridge"] is not None:  # solder bridge: a grey blob joining two pads
        k = p["bridge"]
        cx, cy = (xs[k] + xs[k + 1]) / 2, 0.76 * h
        ell = cv2.ellipse2Poly((int(cx * 16), int(cy * 16)), (int(pitch * 0.55 * 16), int(0.045 * h * 16)), 0, 0, 360, 10)
        _fill(img, ell.astype(np.float32) / 16, (175, 178, 182))
    housing_top, housing_bot = 0.44 * h, 0.66 * h
    _fill(img, _rect(0.1 * w, housing_top, 0.9 * w, housing_bot), (30, 30, 32))
    _fill(img, _rect(0.1 * w, housing_top, 0.9 * w, housing_top + 0.03 * h), (30 + 50 * p["gloss"],) * 3)  # gloss edge
    for k, x in enumerate(xs):
        _fill(img, _rect(x - pin_w, housing_top + 0.03 * h, x + pin_w, housing_top + 0.08 * h), (12, 12, 12))  # pin exit
        if p["missing"] == k:
            continue
        ang = np.deg2rad(p["bent"][1]) if p["bent"] is not None and p["bent"][0] == k else 0.0
        base = np.array([x, housing_top + 0.04 * h])
        top = 0.07 * h
        length = base[1] - top
        d = np.array([np.sin(ang), -np.cos(ang)])  # along the pin, up
        n = np.array([np.cos(ang), np.sin(ang)])  # across
        quad = np.array([base - n * pin_w / 2, base + n * pin_w / 2, base + n * pin_w / 2 + d * length,
                         base - n * pin_w / 2 + d * length], np.float32)
        gold = np.array([55, 165, 205], np.float32) * p["pin_gain"][k]
        _fill(img, quad, gold)
        hl = np.array([base - n * pin_w / 8, base + n * pin_w / 8, base + n * pin_w / 8 + d * length * 0.97,
                       base - n * pin_w / 8 + d * length * 0.97], np.float32)
        _fill(img, hl, np.clip(gold * 1.3, 0, 255))
    roi = np.zeros((h, w), np.uint8)
    cv2.fillPoly(roi, [np.round(pcb).astype(np.int32)], 1)
    M = cv2.getRotationMatrix2D((w / 2, h / 2), p["angle"], p["scale"])
    M[:, 2] += p["shift"]
    img = cv2.warpAffine(img, M, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    roi = cv2.warpAffine(roi, M, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT)
    return np.clip(img, 0, 255).astype(np.float32), roi > 0


def connector_bent(rng: np.random.Generator, p: dict) -> dict:
    """One pin bent sideways by 8-20 degrees."""
    return {**p, "bent": (int(rng.integers(N_PINS)), float(rng.uniform(8, 20) * rng.choice([-1, 1])))}


def connector_missing(rng: np.random.Generator, p: dict) -> dict:
    """One pin missing (its exit hole in the housing stays)."""
    return {**p, "missing": int(rng.integers(N_PINS))}


def connector_bridge(rng: np.random.Generator, p: dict) -> dict:
    """Extra solder joining two neighbouring pads."""
    return {**p, "bridge": int(rng.integers(N_PINS - 1))}
