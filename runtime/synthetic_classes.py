"""A multi-class anomaly-detection benchmark: synthetic objects and textures, and real texture tiles.

    python -m runtime.synthetic_classes --out data/multiclass                 # every synthetic class
    python -m runtime.synthetic_classes --out data/multiclass --real-textures # + brick, grass, gravel
    python -m runtime.synthetic_classes --list

Why: one model for many products (UniAD), cross-class onboarding and the memory-bank family
need many classes with pixel-exact ground truth, and the only real data here is a few MVTec
classes. Each class is written in MVTec AD layout (CLASS/train/good, CLASS/test/<type>,
CLASS/ground_truth/<type>/<name>_mask.png), deterministic for a seed: an image depends only on
(seed, class, split, defect, index), so asking for fewer classes or fewer images never changes
the ones that are written.

Classes (``--list`` prints them with their defects):
- objects: ``board`` and ``tray`` (``runtime.synthetic``; their logical defects included),
  ``screw`` (free rotation), ``connector`` (a non-square strip, 1:2);
- textures: ``fabric`` (plain weave), ``wood``, ``leather`` (procedural);
- real textures (``--real-textures``, needs scikit-image): ``brick``, ``grass``, ``gravel`` from
  ``skimage.data``, grayscale tiles; train and test tiles come from disjoint parts of the photo.

numpy + OpenCV only (scikit-image only for the real textures).
"""
from __future__ import annotations

import functools
import json
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from . import synthetic_objects as obj
from . import synthetic_textures as tex
from .artifact import atomic_write_bytes, atomic_write_text
from .synthetic import LOGICAL, STRUCTURAL, TRAY_LOGICAL, make_part, make_tray
from .synthetic_damage import mask_from_difference, paint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Defect:
    """How one defect type is made: a painter from ``synthetic_damage`` on the good image, or a
    change of the scene's parameters (``modify(rng, params) -> params``) rendered again."""
    description: str
    paint: str | None = None
    modify: Callable | None = None
    on_part: bool = True  # a painted defect starts on the part (roi), not on the background
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ClassSpec:
    name: str
    kind: str  # "object", "texture" or "real_texture"
    description: str
    defects: dict[str, Defect]
    shape: Callable[[int], tuple[int, int]] = lambda size: (size, size)
    sample: Callable | None = None  # (rng, h, w, split) -> params
    render: Callable | None = None  # params -> (float BGR [H,W,3], roi bool [H,W] | None)
    legacy: Callable | None = None  # runtime.synthetic maker(rng, size, defect) -> Part
    grey: bool = False  # written as single-channel PNG (a monochrome camera)


@dataclass
class Sample:
    image: np.ndarray  # uint8 [H,W,3] BGR, or [H,W] for grey classes
    mask: np.ndarray  # uint8 [H,W], 255 = defect
    defect: str  # "good" or a defect type
    good: np.ndarray | None  # the same scene without the defect (same shape as image); None for board/tray's own defects


# ----------------------------------------------------------------------------- real textures

REAL_SOURCES = ("brick", "grass", "gravel")
ISOTROPIC = ("grass", "gravel")  # may be rotated by any angle; brick only flipped (its courses stay level)
TRAIN_ROWS, TEST_ROWS = (0.0, 0.5), (0.54, 1.0)  # of the photo's height: disjoint, with a gap
TILE_SIDE = (0.26, 0.32)  # of the photo's height, before the resize to the output size


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    """A scikit-image sample photo as float32 grey [H, W]."""
    try:
        import skimage.data
    except ImportError as e:
        raise RuntimeError(f"real texture {name!r} needs scikit-image: `pip install scikit-image` (or drop "
                           "--real-textures)") from e
    return np.asarray(getattr(skimage.data, name)(), np.float32)


@functools.lru_cache(maxsize=None)
def _photo_stats(name: str) -> tuple[float, float]:
    photo = _photo(name)
    return float(photo.mean()), float(photo.std())


def _sample_tile(name: str) -> Callable:
    def sample(rng: np.random.Generator, h: int, w: int, split: str) -> dict:
        """A square tile inside the split's rows; its rotated footprint (any angle) stays inside them too."""
        photo = _photo(name)
        ph, pw = photo.shape
        r0, r1 = TRAIN_ROWS if split == "train" else TEST_ROWS
        r0, r1 = int(r0 * ph), int(r1 * ph)
        side = rng.uniform(*TILE_SIDE) * ph
        reach = side / np.sqrt(2) + 1  # half the diagonal: the footprint of the tile at any angle
        reach = min(reach, (r1 - r0) / 2, pw / 2)
        return {"name": name, "cy": rng.uniform(r0 + reach, r1 - reach), "cx": rng.uniform(reach, pw - reach),
                "side": side, "h": h, "w": w, "angle": rng.uniform(0, 360) if name in ISOTROPIC else 0.0,
                "flip_x": bool(rng.random() < 0.5), "flip_y": bool(rng.random() < 0.5), "contrast": rng.uniform(0.85, 1.15)}
    return sample


def _render_tile(p: dict) -> tuple[np.ndarray, None]:
    """Rotate the photo about the tile centre and cut the tile out at the output size (one warp)."""
    photo = _photo(p["name"])
    h, w, side = p["h"], p["w"], p["side"]
    M = cv2.getRotationMatrix2D((p["cx"], p["cy"]), p["angle"], 1.0)
    M[:, 2] += (side / 2 - p["cx"], side / 2 - p["cy"])  # tile centre -> (side/2, side/2)
    M = np.diag([w / side, h / side]) @ M  # then scale the tile to the output size
    t = cv2.warpAffine(photo, M, (w, h), flags=cv2.INTER_AREA if side > max(h, w) else cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_REFLECT)
    if p["flip_x"]:
        t = t[:, ::-1]
    if p["flip_y"]:
        t = t[::-1]
    photo_mean, photo_std = _photo_stats(p["name"])  # every tile at the photo's level: no lighting shift between splits
    t = (t - t.mean()) / (t.std() + 1e-6) * photo_std * p["contrast"] + photo_mean
    return np.repeat(np.ascontiguousarray(t)[..., None], 3, axis=2).astype(np.float32), None


# ----------------------------------------------------------------------------- the classes

def _textured(sample: Callable, render: Callable) -> tuple[Callable, Callable]:
    return (lambda rng, h, w, split: sample(rng, h, w)), (lambda p: (render(p), None))


_STRUCTURAL = {"scratch": "bright straight line", "spot": "dark round spot (contamination)", "crack": "dark jagged line"}
_LEGACY_BOARD = {**{d: Defect(t) for d, t in _STRUCTURAL.items()},
                 "missing": Defect("logical: a component missing (missing part)"),
                 "duplicated": Defect("logical: a copy of a component in the free centre (extra part)"),
                 "swapped": Defect("logical: a component in another component's colour"),
                 "misplaced": Defect("logical: a component moved to the free centre; mask = old and new place")}
_LEGACY_TRAY = {**{d: Defect(t) for d, t in _STRUCTURAL.items()},
                "extra": Defect("logical: a seventh pellet (extra part)"),
                "missing": Defect("logical: a pellet missing; it has no place, so the mask is the whole tray"),
                "wrong_mix": Defect("logical: a pellet in the wrong colour (counts 3/1 instead of 2/2)")}
_fabric = _textured(tex.sample_fabric, tex.render_fabric)
_wood = _textured(tex.sample_wood, tex.render_wood)
_leather = _textured(tex.sample_leather, tex.render_leather)
# Busy natural textures hide small damage: defects are drawn larger, the busier the photo the larger
# (set once by eye and by the kNN difficulty run at 128 px, benchmarks/synthetic_difficulty.py).
REAL_DEFECT_SIZE = {"brick": 1.5, "gravel": 2.2, "grass": 2.6}


def _real_defects(name: str) -> dict[str, Defect]:
    big = {"size": REAL_DEFECT_SIZE[name]}
    return {"scratch": Defect("thin bright or dark line", paint="scratch", kwargs=big),
            "crack": Defect("jagged dark line with a branch", paint="crack", kwargs=big),
            "hole": Defect("small dark opening with a faint rim", paint="hole", kwargs=big),
            "contamination": Defect("foreign textured blob", paint="contamination", kwargs=big),
            "stain": Defect("dried liquid, darker at its rim", paint="stain", kwargs=big)}


CLASSES: dict[str, ClassSpec] = {c.name: c for c in [
    ClassSpec("board", "object", "grey board with four components in a fixed layout (runtime.synthetic)",
              {**_LEGACY_BOARD, "colour": Defect("discoloured patch on the board", paint="colour")}, legacy=make_part),
    ClassSpec("tray", "object", "tray with six pellets at random places, two of each colour (runtime.synthetic)",
              {**_LEGACY_TRAY, "colour": Defect("discoloured patch on the tray", paint="colour")}, legacy=make_tray),
    ClassSpec("screw", "object", "machine screw on a light plate, any orientation",
              {"scratch": Defect("bright scrape on the metal", paint="scratch"),
               "tip": Defect("tip broken off (missing part)", modify=obj.screw_tip_cut),
               "thread": Defect("stripped thread: a few pitches worn smooth", modify=obj.screw_stripped),
               "contamination": Defect("foreign blob on the screw", paint="contamination"),
               "colour": Defect("rust-like discolouration", paint="colour", kwargs={"tint": (0.7, 0.95, 1.3)})},
              sample=lambda rng, h, w, split: obj.sample_screw(rng, h, w), render=obj.render_screw),
    ClassSpec("connector", "object", "8-pin header on a green board strip, 1:2 (height:width) images",
              {"bent_pin": Defect("one pin bent sideways", modify=obj.connector_bent),
               "missing_pin": Defect("one pin missing (missing part)", modify=obj.connector_missing),
               "solder_bridge": Defect("solder joining two pads (extra part)", modify=obj.connector_bridge),
               "scratch": Defect("scratch on board or housing", paint="scratch"),
               "contamination": Defect("foreign blob", paint="contamination"),
               "colour": Defect("burn mark / discoloured board", paint="colour", kwargs={"tint": (0.6, 0.7, 0.85)})},
              shape=obj.connector_shape, sample=lambda rng, h, w, split: obj.sample_connector(rng, h, w),
              render=obj.render_connector),
    ClassSpec("fabric", "texture", "plain-weave fabric, random phase and angle",
              {"hole": Defect("hole through the cloth", paint="hole"),
               "cut": Defect("thin dark cut", paint="crack"),
               "thread": Defect("weaving fault: one weft thread floats over several warps",
                                modify=lambda rng, p: tex.float_thread(rng, p)),
               "stain": Defect("dried liquid", paint="stain"),
               "colour": Defect("dye fault: colour shifted in a patch", paint="colour")},
              sample=_fabric[0], render=_fabric[1]),
    ClassSpec("wood", "texture", "planed wood, grain along x, knots in about a third of the good images",
              {"scratch": Defect("scratch across the grain", paint="scratch"),
               "crack": Defect("split along the grain", paint="crack", kwargs={"heading": 0.0}),
               "hole": Defect("worm hole", paint="hole"),
               "stain": Defect("dried liquid", paint="stain"),
               "colour": Defect("discoloured patch", paint="colour")},
              sample=_wood[0], render=_wood[1]),
    ClassSpec("leather", "texture", "grained leather with fine creases",
              {"cut": Defect("thin dark cut", paint="crack"),
               "fold": Defect("a long crease, dark on one side and light on the other", paint="fold"),
               "poke": Defect("small hole", paint="hole"),
               "glue": Defect("foreign blob (glue, dirt)", paint="contamination"),
               "colour": Defect("discoloured patch", paint="colour")},
              sample=_leather[0], render=_leather[1]),
    *[ClassSpec(n, "real_texture", f"grayscale tiles of scikit-image's {n!r} photo, painted defects",
                _real_defects(n), sample=_sample_tile(n), render=_render_tile, grey=True) for n in REAL_SOURCES],
]}
SYNTHETIC = tuple(n for n, c in CLASSES.items() if c.kind != "real_texture")


def _rng(seed: int, cls: str, split: str, defect: str, index: int) -> np.random.Generator:
    """One generator per image, from its identity alone (stable across Python runs: crc32, not hash())."""
    key = [seed, zlib.crc32(cls.encode()), zlib.crc32(split.encode()), zlib.crc32(defect.encode()), index]
    return np.random.default_rng(key)


def _camera(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Exposure and a lighting gradient (multiplicative field [H,W,1]) and sensor noise [H,W,3]."""
    gain = rng.uniform(0.9, 1.1)
    gx, gy = rng.uniform(-0.08, 0.08, 2)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    light = gain * (1 + gx * (xx / w - 0.5) + gy * (yy / h - 0.5))
    return light[..., None].astype(np.float32), rng.normal(0, 2.0, (h, w, 3)).astype(np.float32)


def make_sample(cls: str, defect: str = "good", size: int = 256, rng: np.random.Generator | None = None,
                split: str = "test") -> Sample:
    """One image of class ``cls`` with ``defect`` ("good" or a defect type), its mask and its good twin.

    ``split`` "train" or "test" matters only for real textures (disjoint parts of the photo).
    """
    if cls not in CLASSES:
        raise ValueError(f"unknown class {cls!r}; choose from {', '.join(CLASSES)}")
    spec = CLASSES[cls]
    if defect != "good" and defect not in spec.defects:
        raise ValueError(f"class {cls!r} has no defect {defect!r}; choose from good, {', '.join(spec.defects)}")
    if size < 32:
        raise ValueError(f"size {size} is too small; use at least 32 px")
    rng = rng if rng is not None else np.random.default_rng(0)
    if spec.legacy is not None:
        if defect == "good" or spec.defects[defect].paint is None:
            part = spec.legacy(rng, size, defect)
            return Sample(part.image, part.mask, defect, part.image if defect == "good" else None)
        good = spec.legacy(rng, size, "good").image
        roi = np.zeros(good.shape[:2], bool)
        roi[int(0.2 * size):int(0.8 * size), int(0.2 * size):int(0.8 * size)] = True
        img, mask = paint(rng, good.astype(np.float32), spec.defects[defect].paint, roi)
        img = np.clip(np.round(img), 0, 255).astype(np.uint8)
        img[~mask] = good[~mask]
        return Sample(img, mask.astype(np.uint8) * 255, defect, good)
    h, w = spec.shape(size)
    params = spec.sample(rng, h, w, split)
    good, roi = spec.render(params)
    img, mask = good, np.zeros((h, w), bool)
    if defect != "good":
        d = spec.defects[defect]
        if d.paint is not None:
            img, mask = paint(rng, good, d.paint, roi if d.on_part else None, **d.kwargs)
        else:
            for _ in range(10):  # a change may fall where it shows too little (e.g. behind nothing): draw again
                changed, _ = spec.render(d.modify(rng, params))
                mask = mask_from_difference(good, changed)
                if mask.sum() >= 12:
                    break
            img = np.where(mask[..., None], changed, good)
    light, noise = _camera(rng, h, w)
    good8 = np.clip(np.round(good * light + noise), 0, 255).astype(np.uint8)
    img8 = np.clip(np.round(img * light + noise), 0, 255).astype(np.uint8)
    if spec.grey:
        good8, img8 = cv2.cvtColor(good8, cv2.COLOR_BGR2GRAY), cv2.cvtColor(img8, cv2.COLOR_BGR2GRAY)
    img8[~mask] = good8[~mask]  # nothing outside the ground truth differs from the good twin
    return Sample(img8, mask.astype(np.uint8) * 255, defect, good8)


def _png(path: Path, image: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError(f"{path}: PNG encoding failed")
    atomic_write_bytes(path, buf.tobytes())


def write_class(root: str | Path, cls: str, size: int = 256, n_train: int = 60, n_test_good: int = 20,
                n_per_defect: int = 10, seed: int = 0, defects: tuple[str, ...] | None = None) -> Path:
    """Write one class in MVTec AD layout under ``root/cls``; returns that folder. manifest.json comes last."""
    spec = CLASSES[cls]
    defects = tuple(spec.defects) if defects is None else defects
    folder = Path(root) / cls
    plan = [("train", "good", n_train), ("test", "good", n_test_good)] + [("test", d, n_per_defect) for d in defects]
    for split, defect, n in plan:
        if n <= 0:
            continue
        (folder / split / defect).mkdir(parents=True, exist_ok=True)
        if defect != "good":
            (folder / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            s = make_sample(cls, defect, size, _rng(seed, cls, split, defect, i), split)
            _png(folder / split / defect / f"{i:03d}.png", s.image)
            if defect != "good":
                _png(folder / "ground_truth" / defect / f"{i:03d}_mask.png", s.mask)
    h, w = spec.shape(size)
    manifest = {"generator": "edgead.runtime.synthetic_classes", "class": cls, "kind": spec.kind,
                "description": spec.description, "seed": seed, "size": size, "height": h, "width": w,
                "channels": 1 if spec.grey else 3,
                "defects": {d: spec.defects[d].description for d in defects},
                "counts": {"train": n_train, "test_good": n_test_good, "per_defect": n_per_defect}}
    if spec.legacy is not None:
        logical = LOGICAL if cls == "board" else TRAY_LOGICAL
        manifest["logical"] = [d for d in defects if d in logical]
    atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    log.info("%s: %d train, %d test good, %d x %d defective -> %s", cls, n_train, n_test_good, len(defects),
             n_per_defect, folder)
    return folder


def write_classes(root: str | Path, classes: tuple[str, ...] = SYNTHETIC, size: int = 256, n_train: int = 60,
                  n_test_good: int = 20, n_per_defect: int = 10, seed: int = 0) -> Path:
    """Write several classes side by side under ``root`` (a parent folder of classes) and an index manifest."""
    root = Path(root)
    unknown = [c for c in classes if c not in CLASSES]
    if unknown:
        raise ValueError(f"unknown classes {unknown}; choose from {', '.join(CLASSES)}")
    root.mkdir(parents=True, exist_ok=True)
    for c in classes:
        write_class(root, c, size, n_train, n_test_good, n_per_defect, seed)
    index = {"generator": "edgead.runtime.synthetic_classes", "seed": seed, "size": size,
             "classes": {c: {"kind": CLASSES[c].kind, "defects": list(CLASSES[c].defects)} for c in classes}}
    atomic_write_text(root / "manifest.json", json.dumps(index, indent=2) + "\n")
    return root


def main(argv: list[str] | None = None) -> int:
    """`python -m runtime.synthetic_classes --out DIR`: write the multi-class benchmark."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m runtime.synthetic_classes",
                                description="Write a seeded multi-class anomaly dataset (synthetic objects and textures, "
                                "optionally real texture tiles), one MVTec-layout folder per class, exact masks.")
    p.add_argument("--out", help="parent folder; one sub-folder per class is written into it")
    p.add_argument("--classes", nargs="+", metavar="NAME", help=f"classes to write (default: {' '.join(SYNTHETIC)})")
    p.add_argument("--real-textures", action="store_true",
                   help=f"also write {', '.join(REAL_SOURCES)} (tiles of scikit-image photos; needs scikit-image)")
    p.add_argument("--size", type=int, default=256, help="image side in px (connector: height = size/2)")
    p.add_argument("--train", type=int, default=60, help="good training images per class")
    p.add_argument("--test-good", type=int, default=20, help="good test images per class")
    p.add_argument("--per-defect", type=int, default=10, help="test images per defect type")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="print the classes and their defects, write nothing")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if a.list:
        for name, spec in CLASSES.items():
            print(f"{name:10s} {spec.kind:12s} {spec.description}")
            for d, dd in spec.defects.items():
                print(f"{'':24s} {d:14s} {dd.description}")
        return 0
    if not a.out:
        p.error("--out is required (or use --list)")
    classes = tuple(a.classes) if a.classes else SYNTHETIC
    if a.real_textures:
        classes += tuple(c for c in REAL_SOURCES if c not in classes)
    unknown = [c for c in classes if c not in CLASSES]
    if unknown:
        p.error(f"unknown class(es) {', '.join(unknown)}; choose from {', '.join(CLASSES)}")
    if a.size < 32 or min(a.train, a.test_good, a.per_defect) < 0 or a.train < 1:
        p.error("--size must be >= 32, --train >= 1, --test-good and --per-defect >= 0")
    try:
        print(write_classes(a.out, classes, a.size, a.train, a.test_good, a.per_defect, a.seed))
    except (RuntimeError, OSError) as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
