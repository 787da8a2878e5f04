"""Procedural textures for the multi-class benchmark: woven fabric, wood, leather.

Each texture is a pure function of a parameter dict drawn from a seeded generator
(``sample_*``), so a defect that changes the structure itself (a floating thread) is
the same texture rendered again with one change, and its mask is the difference.
Good images differ in phase, angle, thread/grain spacing, colour and fine noise, so a
model cannot learn one fixed picture.

Every render returns float32 BGR [H, W, 3] in [0, 255]. numpy + OpenCV only.
"""
from __future__ import annotations

import cv2
import numpy as np

from .synthetic_damage import fbm, smooth_noise


def _rotated_grid(h: int, w: int, angle: float, ox: float, oy: float) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    xx -= w / 2
    yy -= h / 2
    c, s = np.cos(angle), np.sin(angle)
    return xx * c + yy * s + ox, -xx * s + yy * c + oy


# ----------------------------------------------------------------------------- woven fabric

def sample_fabric(rng: np.random.Generator, h: int, w: int) -> dict:
    """Plain weave, thread period about 11 px at 256 px, rotated up to 4 degrees, random phase."""
    scale = max(h, w) / 256
    period = rng.uniform(10.0, 12.0) * scale
    return {"h": h, "w": w, "period": period, "angle": np.deg2rad(rng.uniform(-4, 4)),
            "ox": rng.uniform(0, 2 * period), "oy": rng.uniform(0, 2 * period),
            "warp_gain": rng.uniform(0.85, 1.0, 512).astype(np.float32),
            "weft_gain": rng.uniform(0.85, 1.0, 512).astype(np.float32),
            "wobble": (smooth_noise(rng, h, w, 24 * scale) * 0.6 * scale, smooth_noise(rng, h, w, 24 * scale) * 0.6 * scale),
            "fuzz": fbm(rng, h, w, 2.0 * scale, 2),
            "colour": np.array([150, 115, 80], np.float32) * rng.uniform(0.93, 1.07, 3).astype(np.float32),
            "float": None}


def render_fabric(p: dict) -> np.ndarray:
    """Over/under checkerboard of warp (vertical) and weft (horizontal) threads, each a rounded yarn."""
    h, w, period = p["h"], p["w"], p["period"]
    x, y = _rotated_grid(h, w, p["angle"], p["ox"], p["oy"])
    x = x + p["wobble"][0]
    y = y + p["wobble"][1]
    i = np.floor(x / period).astype(np.int64)
    j = np.floor(y / period).astype(np.int64)
    fx, fy = x / period - i, y / period - j
    warp_top = (i + j) % 2 == 0
    weft_gain = p["weft_gain"][j % 512]
    if p["float"] is not None:  # a weft thread floats over the warp along a stretch (a weaving fault), a little lighter
        row, i0, i1, gain = p["float"]
        floating = (j == row) & (i >= i0) & (i <= i1)
        warp_top &= ~floating
        weft_gain = np.where(floating, weft_gain * gain, weft_gain)
    bump_x, bump_y = np.sin(np.pi * fx) ** 0.6, np.sin(np.pi * fy) ** 0.6
    warp = bump_x * (0.72 + 0.28 * np.sin(np.pi * fy)) * p["warp_gain"][i % 512]
    weft = bump_y * (0.72 + 0.28 * np.sin(np.pi * fx)) * weft_gain
    val = np.where(warp_top, warp, weft) + 0.06 * p["fuzz"]
    return np.clip(p["colour"] * (0.35 + 0.8 * val[..., None]), 0, 255).astype(np.float32)


def float_thread(rng: np.random.Generator, p: dict) -> dict:
    """The same fabric with one weft thread floating over 4-8 warp threads."""
    q = dict(p)
    x, y = _rotated_grid(p["h"], p["w"], p["angle"], p["ox"], p["oy"])
    cy, cx = rng.uniform(0.2, 0.8) * p["h"], rng.uniform(0.2, 0.8) * p["w"]
    row = int(np.floor(y[int(cy), int(cx)] / p["period"]))
    col = int(np.floor(x[int(cy), int(cx)] / p["period"]))
    q["float"] = (row, col, col + int(rng.integers(4, 9)), rng.uniform(1.05, 1.15))
    return q


# ----------------------------------------------------------------------------- wood

def sample_wood(rng: np.random.Generator, h: int, w: int) -> dict:
    """Planed board, grain along x within 6 degrees, ring spacing 9-14 px at 256 px; a knot in a third of them."""
    scale = max(h, w) / 256
    knot = None
    if rng.random() < 0.35:
        knot = (rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h, rng.uniform(6, 12) * scale)
    return {"h": h, "w": w, "period": rng.uniform(9, 14) * scale, "angle": np.deg2rad(rng.uniform(-6, 6)),
            "phase": rng.uniform(0, 1), "bend": (rng.uniform(0, 10) * scale, rng.uniform(150, 400) * scale, rng.uniform(0, 6.3)),
            "turb": fbm(rng, h, w, 60 * scale, 3) * 7 * scale,
            "fibres": cv2.resize(rng.standard_normal((max(2, h // 2), max(2, w // 24))).astype(np.float32), (w, h),
                                 interpolation=cv2.INTER_CUBIC),
            "colour": np.array([75, 125, 180], np.float32) * rng.uniform(0.9, 1.08) * rng.uniform(0.96, 1.04, 3).astype(np.float32),
            "knot": knot}


def render_wood(p: dict) -> np.ndarray:
    """Rings: dark latewood bands on lighter earlywood, bent by slow noise, with streaky fibres."""
    h, w = p["h"], p["w"]
    x, y = _rotated_grid(h, w, p["angle"], 0, 0)
    amp, length, phi = p["bend"]
    u = y + p["turb"] + amp * np.sin(2 * np.pi * x / length + phi)
    core = np.zeros((h, w), np.float32)
    if p["knot"] is not None:
        kx, ky, kr = p["knot"]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        r2 = ((xx - kx) ** 2 + (yy - ky) ** 2) / (kr ** 2)
        u = u + 2.5 * kr * np.exp(-r2 / 4) * np.sign(yy - ky + 1e-3)
        core = np.exp(-r2 * 1.5)
    ring = (u / p["period"] + p["phase"]) % 1.0
    late = np.exp(-((ring - 0.75) / 0.12) ** 2)
    val = 1.0 - 0.32 * late + 0.05 * p["fibres"] - 0.45 * core
    return np.clip(p["colour"] * val[..., None], 0, 255).astype(np.float32)


# ----------------------------------------------------------------------------- leather

def sample_leather(rng: np.random.Generator, h: int, w: int) -> dict:
    """Grained hide: bumpy height field and a network of fine creases, lit from the top left."""
    scale = max(h, w) / 256
    return {"h": h, "w": w, "height": fbm(rng, h, w, 16 * scale, 4),
            "crease_a": smooth_noise(rng, h, w, 10 * scale), "crease_b": smooth_noise(rng, h, w, 6 * scale),
            "pores": fbm(rng, h, w, 1.5 * scale, 2),
            "colour": np.array([45, 80, 135], np.float32) * rng.uniform(0.9, 1.1) * rng.uniform(0.96, 1.04, 3).astype(np.float32),
            "light": rng.uniform(0.3, 0.6)}


def render_leather(p: dict) -> np.ndarray:
    """Height-shaded bumps, darker along the zero lines of two noise fields (the creases), fine pores."""
    hgt = p["height"]
    gx = cv2.Sobel(hgt, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(hgt, cv2.CV_32F, 0, 1, ksize=3)
    shade = 1 + p["light"] * (gx + gy) / (np.abs(gx).mean() + np.abs(gy).mean() + 1e-6) * 0.15
    crease = 0.55 * np.exp(-(p["crease_a"] / 0.10) ** 2) + 0.3 * np.exp(-(p["crease_b"] / 0.08) ** 2)
    val = (0.9 + 0.1 * hgt) * shade * (1 - 0.3 * crease) + 0.04 * p["pores"]
    return np.clip(p["colour"] * val[..., None], 0, 255).astype(np.float32)
