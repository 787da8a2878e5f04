"""Deterministic synthetic "parts" for tests, the demo stream and the logical-anomaly check.

A part is a grey board on a textured conveyor, carrying four components in fixed
places (red disc, green disc, blue square, yellow bar). Good parts vary a little in
position, angle and lighting. Defects come in two families:

- structural (picturable): scratch, spot, crack - local texture damage;
- logical (unpicturable): a component missing, duplicated, swapped in colour, or moved -
  every patch still looks like a normal patch, only the arrangement is wrong.

Every defect has an exact mask. numpy + OpenCV only, so the runtime's ``--demo`` can use it.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

STRUCTURAL = ("scratch", "spot", "crack")
LOGICAL = ("missing", "duplicated", "swapped", "misplaced")

# component: (relative centre x, y), colour BGR, shape
_COMPONENTS = [
    ((0.32, 0.34), (40, 40, 210), "disc"),
    ((0.68, 0.34), (50, 180, 50), "disc"),
    ((0.32, 0.68), (200, 90, 30), "square"),
    ((0.68, 0.68), (30, 200, 220), "bar"),
]
_FREE_SPOT = (0.50, 0.51)  # where a duplicated or misplaced component lands


@dataclass
class Part:
    image: np.ndarray  # HxWx3 BGR uint8
    mask: np.ndarray  # HxW uint8, 255 = defect
    defect: str  # "good" or one of STRUCTURAL + LOGICAL


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    noise = rng.normal(0, 1, (size // 8 + 1, size // 8 + 1)).astype(np.float32)
    noise = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
    base = 70 + 6 * noise + rng.normal(0, 2, (size, size))
    return np.clip(np.repeat(base[..., None], 3, 2), 0, 255).astype(np.uint8)


def _draw_component(img: np.ndarray, centre: tuple[float, float], colour, shape: str, r: float) -> None:
    cx, cy = int(round(centre[0])), int(round(centre[1]))
    ri = max(2, int(round(r)))
    if shape == "disc":
        cv2.circle(img, (cx, cy), ri, colour, -1, cv2.LINE_AA)
    elif shape == "square":
        cv2.rectangle(img, (cx - ri, cy - ri), (cx + ri, cy + ri), colour, -1, cv2.LINE_AA)
    else:
        cv2.rectangle(img, (cx - int(1.6 * ri), cy - ri // 2), (cx + int(1.6 * ri), cy + ri // 2), colour, -1, cv2.LINE_AA)


def _component_mask(size: int, centre, shape: str, r: float) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    _draw_component(m, centre, 255, shape, r * 1.15)
    return m


def make_part(rng: np.random.Generator, size: int = 256, defect: str = "good") -> Part:
    """One part image with its mask. ``defect`` is "good" or a name from STRUCTURAL/LOGICAL."""
    if defect != "good" and defect not in STRUCTURAL + LOGICAL:
        raise ValueError(f"unknown defect {defect!r}; choose from good, {', '.join(STRUCTURAL + LOGICAL)}")
    img = _background(rng, size)
    mask = np.zeros((size, size), np.uint8)
    dx, dy = rng.uniform(-0.015, 0.015, 2) * size
    angle = rng.uniform(-2.0, 2.0)
    light = rng.uniform(0.93, 1.07)
    board = np.zeros_like(img)
    s = size
    cv2.rectangle(board, (int(0.15 * s), int(0.17 * s)), (int(0.85 * s), int(0.85 * s)), (150, 150, 150), -1)
    texture = rng.normal(0, 3, (s, s, 1))
    inside = board[..., 0] > 0
    img[inside] = np.clip(board[inside] + texture[inside], 0, 255).astype(np.uint8)
    # screw holes for a little structure
    for fx, fy in ((0.2, 0.22), (0.8, 0.22), (0.2, 0.8), (0.8, 0.8)):
        cv2.circle(img, (int(fx * s), int(fy * s)), max(2, s // 64), (60, 60, 60), -1, cv2.LINE_AA)
    r = 0.075 * s
    comps = [([cx * s, cy * s], col, shp) for (cx, cy), col, shp in _COMPONENTS]
    free = [_FREE_SPOT[0] * s, _FREE_SPOT[1] * s]
    if defect in LOGICAL:
        k = int(rng.integers(len(comps)))
        centre, col, shp = comps[k]
        if defect == "missing":
            mask |= _component_mask(s, centre, shp, r)
            comps.pop(k)
        elif defect == "duplicated":
            comps.append((free, col, shp))
            mask |= _component_mask(s, free, shp, r)
        elif defect == "swapped":
            j = (k + 1 + int(rng.integers(len(comps) - 1))) % len(comps)
            comps[k] = (centre, comps[j][1], shp)
            mask |= _component_mask(s, centre, shp, r)
        elif defect == "misplaced":
            mask |= _component_mask(s, centre, shp, r) | _component_mask(s, free, shp, r)
            comps[k] = (free, col, shp)
    for centre, col, shp in comps:
        _draw_component(img, centre, col, shp, r)
    if defect in STRUCTURAL:
        m = np.zeros((s, s), np.uint8)
        x0, y0 = rng.uniform(0.25, 0.75, 2) * s
        if defect == "scratch":
            ang = rng.uniform(0, np.pi)
            L = rng.uniform(0.12, 0.25) * s
            p0 = (int(x0 - L / 2 * np.cos(ang)), int(y0 - L / 2 * np.sin(ang)))
            p1 = (int(x0 + L / 2 * np.cos(ang)), int(y0 + L / 2 * np.sin(ang)))
            thick = max(1, s // 128)
            cv2.line(img, p0, p1, (235, 235, 235), thick, cv2.LINE_AA)
            cv2.line(m, p0, p1, 255, thick + 2)
        elif defect == "spot":
            rad = int(rng.uniform(0.02, 0.04) * s)
            cv2.circle(img, (int(x0), int(y0)), rad, (25, 35, 45), -1, cv2.LINE_AA)
            cv2.circle(m, (int(x0), int(y0)), rad + 1, 255, -1)
        else:  # crack: a jagged dark polyline
            pts = [(x0, y0)]
            ang = rng.uniform(0, 2 * np.pi)
            for _ in range(6):
                ang += rng.uniform(-0.8, 0.8)
                step = rng.uniform(0.02, 0.04) * s
                pts.append((pts[-1][0] + step * np.cos(ang), pts[-1][1] + step * np.sin(ang)))
            poly = np.array(pts, np.int32).reshape(-1, 1, 2)
            thick = max(1, s // 96)
            cv2.polylines(img, [poly], False, (20, 20, 20), thick, cv2.LINE_AA)
            cv2.polylines(m, [poly], False, 255, thick + 2)
        mask |= m
    # global pose and lighting jitter, applied to image and mask alike
    M = cv2.getRotationMatrix2D((s / 2, s / 2), angle, 1.0)
    M[:, 2] += (dx, dy)
    img = cv2.warpAffine(img, M, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    mask = cv2.warpAffine(mask, M, (s, s), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT)
    img = np.clip(img.astype(np.float32) * light + rng.normal(0, 1.5, img.shape), 0, 255).astype(np.uint8)
    return Part(img, (mask > 0).astype(np.uint8) * 255, defect)


TRAY_LOGICAL = ("extra", "missing", "wrong_mix")
_PELLET_COLOURS = [(40, 40, 210), (50, 180, 50), (200, 90, 30)]  # two of each on every good tray


def make_tray(rng: np.random.Generator, size: int = 256, defect: str = "good") -> Part:
    """A tray of six pellets (two red, two green, two blue) scattered at random.

    Logical defects change only the counts ("extra": a seventh pellet; "missing": five;
    "wrong_mix": one pellet takes another pellet's colour). Every local patch still looks
    normal, and the layout is random, so neither a patch model nor a layout model can
    see them: only the composition (pooled features) tells. Structural defects as in make_part.
    """
    if defect != "good" and defect not in STRUCTURAL + TRAY_LOGICAL:
        raise ValueError(f"unknown tray defect {defect!r}; choose from good, {', '.join(STRUCTURAL + TRAY_LOGICAL)}")
    s = size
    img = _background(rng, s)
    cv2.rectangle(img, (int(0.1 * s), int(0.1 * s)), (int(0.9 * s), int(0.9 * s)), (150, 150, 150), -1)
    img = np.clip(img.astype(np.float32) + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
    colours = [c for c in _PELLET_COLOURS for _ in range(2)]
    mask = np.zeros((s, s), np.uint8)
    changed: list[int] = []
    if defect == "extra":
        colours.append(_PELLET_COLOURS[int(rng.integers(3))])
        changed = [len(colours) - 1]
    elif defect == "missing":
        colours.pop(int(rng.integers(len(colours))))
    elif defect == "wrong_mix":
        k = int(rng.integers(len(colours)))
        others = [c for c in _PELLET_COLOURS if c != colours[k]]
        colours[k] = others[int(rng.integers(2))]
        changed = [k]
    r = 0.07 * s
    centres: list[tuple[float, float]] = []
    while len(centres) < len(colours):  # rejection sampling: pellets never touch
        c = tuple(rng.uniform(0.18, 0.82, 2) * s)
        if all((c[0] - o[0]) ** 2 + (c[1] - o[1]) ** 2 > (2.4 * r) ** 2 for o in centres):
            centres.append(c)
    for i, (c, col) in enumerate(zip(centres, colours)):
        _draw_component(img, c, col, "disc", r)
        if i in changed:
            mask |= _component_mask(s, c, "disc", r)
    if defect == "missing":  # the whole tray is the defect: the missing pellet has no place
        mask[int(0.1 * s):int(0.9 * s), int(0.1 * s):int(0.9 * s)] = 255
    if defect in STRUCTURAL:
        part = make_part(rng, s, defect)  # reuse the damage drawing on a board, then keep only its mask area
        m = part.mask > 0
        img[m] = part.image[m]
        mask |= part.mask
    img = np.clip(img.astype(np.float32) * rng.uniform(0.95, 1.05) + rng.normal(0, 1.5, img.shape), 0, 255)
    return Part(img.astype(np.uint8), (mask > 0).astype(np.uint8) * 255, defect)


def write_dataset(root: str | Path, size: int = 256, n_train: int = 60, n_test_good: int = 20,
                  n_per_defect: int = 10, seed: int = 0,
                  defects: tuple[str, ...] | None = None, n_validation: int = 0, product: str = "board") -> Path:
    """Write an MVTec-layout dataset of synthetic parts (deterministic for a seed).

    product "board": fixed layout, make_part; "tray": random layout with count defects, make_tray.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    maker = {"board": make_part, "tray": make_tray}[product]
    logical = LOGICAL if product == "board" else TRAY_LOGICAL
    if defects is None:
        defects = STRUCTURAL + logical
    plan = [("train/good", "good", n_train), ("validation/good", "good", n_validation), ("test/good", "good", n_test_good)]
    plan += [(f"test/{d}", d, n_per_defect) for d in defects]
    for folder, defect, n in plan:
        if n == 0:
            continue
        (root / folder).mkdir(parents=True, exist_ok=True)
        if defect != "good":
            (root / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            part = maker(rng, size, defect)
            cv2.imwrite(str(root / folder / f"{i:03d}.png"), part.image)
            if defect != "good":
                cv2.imwrite(str(root / "ground_truth" / defect / f"{i:03d}_mask.png"), part.mask)
    manifest = {"generator": "edgead.runtime.synthetic", "product": product, "seed": seed, "size": size,
                "structural": [d for d in defects if d in STRUCTURAL], "logical": [d for d in defects if d in logical]}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("wrote synthetic dataset to %s", root)
    return root


def conveyor_frames(n: int | None = None, size: int = 256, seed: int = 0, defect_rate: float = 0.2,
                    frame_size: tuple[int, int] | None = None):
    """Endless (or ``n``) synthetic camera frames: good parts with occasional defects.

    Yields (frame BGR uint8, defect name). ``frame_size`` (w, h) pads the part into a
    larger conveyor frame, like a camera that sees more than the part.
    """
    rng = np.random.default_rng(seed)
    kinds = STRUCTURAL + LOGICAL
    i = 0
    while n is None or i < n:
        defect = "good" if rng.random() >= defect_rate else kinds[int(rng.integers(len(kinds)))]
        part = make_part(rng, size, defect)
        frame = part.image
        if frame_size is not None:
            w, h = frame_size
            frame = cv2.resize(frame, (w, h), interpolation=cv2.INTER_LINEAR)
        yield frame, defect
        i += 1


def main(argv: list[str] | None = None) -> int:
    """`python -m runtime.synthetic --out DIR`: write a synthetic MVTec-layout dataset."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m runtime.synthetic", description="Write a seeded synthetic dataset of parts "
                                "with structural and logical defects (MVTec layout, exact masks).")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--train", type=int, default=60)
    p.add_argument("--test-good", type=int, default=20)
    p.add_argument("--per-defect", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--product", choices=["board", "tray"], default="board",
                   help="board: fixed layout (default); tray: random layouts with count defects")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    print(write_dataset(a.out, a.size, a.train, a.test_good, a.per_defect, a.seed, product=a.product))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
