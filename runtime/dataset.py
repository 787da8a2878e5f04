"""Reading anomaly-detection datasets in MVTec AD and MVTec LOCO AD layouts.

MVTec AD::

    root/train/good/*.png|jpg|bmp
    root/validation/good/...          (optional; LOCO has it)
    root/test/<type>/*                (type "good" = normal)
    root/ground_truth/<type>/<name>_mask.png      (MVTec AD)
    root/ground_truth/<type>/<name>/*.png         (LOCO: one or more masks, united)

Images may be grayscale or colour, any size; they are returned as BGR uint8.
numpy + OpenCV only (the runtime and calibration use it too).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .preprocess import as_bgr

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DatasetError(ValueError):
    """A dataset folder that cannot be read as it is; the message names the folder and the fix."""


@dataclass
class Sample:
    path: Path
    label: int  # 0 good, 1 anomalous
    defect: str  # "good" or the defect type folder name
    mask_paths: list[Path] = field(default_factory=list)


@dataclass
class AnomalyDataset:
    root: Path
    train: list[Path]
    validation: list[Path]
    test: list[Sample]

    @property
    def defect_types(self) -> list[str]:
        return sorted({s.defect for s in self.test if s.label == 1})


def list_images(folder: Path) -> list[Path]:
    """Sorted image files directly in ``folder`` (any supported suffix, any case)."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder not found")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return files


def read_image(path: str | Path) -> np.ndarray:
    """Image file -> HxWx3 BGR uint8; a clear error for missing or unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: image not found")
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DatasetError(f"{path}: not a readable image (corrupt or unsupported format); remove or replace it")
    return as_bgr(img)


def _mask_paths(root: Path, defect: str, image: Path) -> list[Path]:
    gt = root / "ground_truth" / defect
    for cand in (gt / f"{image.stem}_mask.png", gt / f"{image.stem}.png"):
        if cand.is_file():
            return [cand]
    loco = gt / image.stem
    if loco.is_dir():
        return list_images(loco)
    return []


def read_mask(sample: Sample, height: int, width: int, fit: str = "stretch") -> np.ndarray:
    """Ground-truth mask of ``sample`` at (height, width) as bool, fitted like its image
    (``runtime.preprocess.fit_geometry``); all False for good samples."""
    from .preprocess import fit_geometry

    mask = np.zeros((height, width), bool)
    for p in sample.mask_paths:
        m = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
        if m is None:
            raise DatasetError(f"{p}: unreadable mask")
        (cy, cx, ch, cw), (py, px, ph, pw) = fit_geometry(m.shape[0], m.shape[1], height, width, fit)
        part = cv2.resize(m[cy:cy + ch, cx:cx + cw], (pw, ph), interpolation=cv2.INTER_NEAREST) > 127
        mask[py:py + ph, px:px + pw] |= part
    return mask


def open_dataset(root: str | Path, require_test: bool = True) -> AnomalyDataset:
    """Index an MVTec AD / LOCO folder; raise DatasetError naming what is missing."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found; pass the category folder that holds train/good")
    train_dir = root / "train" / "good"
    if not train_dir.is_dir():
        raise DatasetError(f"{root}: no train/good folder; expected MVTec layout root/train/good/*.png")
    train = list_images(train_dir)
    if not train:
        raise DatasetError(f"{train_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    val_dir = root / "validation" / "good"
    validation = list_images(val_dir) if val_dir.is_dir() else []
    test: list[Sample] = []
    test_dir = root / "test"
    if test_dir.is_dir():
        for sub in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            label = 0 if sub.name == "good" else 1
            for img in list_images(sub):
                masks = _mask_paths(root, sub.name, img) if label else []
                test.append(Sample(img, label, sub.name, masks))
    if require_test:
        if not test:
            raise DatasetError(f"{root}: no test images; expected root/test/good and root/test/<defect>/")
        if len({s.label for s in test}) < 2:
            raise DatasetError(f"{root}/test: needs both good and defective images to measure accuracy")
    log.info("dataset %s: %d train, %d validation, %d test", root, len(train), len(validation), len(test))
    return AnomalyDataset(root, train, validation, test)
