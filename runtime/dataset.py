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


MAX_IMAGE_PIXELS = 100_000_000  # 10000 x 10000; a larger header is a broken or hostile file, not a camera frame
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG or BMP header without decoding; None for other formats."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:2] == b"BM" and len(data) >= 26:
        return abs(int.from_bytes(data[18:22], "little", signed=True)), abs(int.from_bytes(data[22:26], "little", signed=True))
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 <= len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in _JPEG_SOF:
                return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
            if marker == 0xDA:  # start of scan before any frame header
                return None
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def decode_image(data: bytes, where: str) -> np.ndarray:
    """Encoded image bytes -> HxWx3 BGR uint8, or DatasetError saying why not (never silent garbage).

    Refused: empty or truncated files (a JPEG without its end marker decodes as grey rows),
    headers claiming more than MAX_IMAGE_PIXELS, float images. Accepted and converted: grayscale,
    alpha (dropped), 16-bit (top 8 bits), CMYK JPEG (libjpeg converts).
    """
    if not data:
        raise DatasetError(f"{where}: empty file (0 bytes); remove or replace it")
    size = header_size(data)
    if size is not None:
        w, h = size
        if w == 0 or h == 0:
            raise DatasetError(f"{where}: image header says {w}x{h} pixels; remove or replace the file")
        if w * h > MAX_IMAGE_PIXELS:
            raise DatasetError(f"{where}: image is {w}x{h} pixels, more than the {MAX_IMAGE_PIXELS:,} this reader "
                               "accepts; downscale it (a camera frame never needs that many)")
    if data[:2] == b"\xff\xd8" and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise DatasetError(f"{where}: truncated JPEG (no end-of-image marker; the file was cut short while being "
                           "written or copied); remove or replace it")
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:
        raise DatasetError(f"{where}: not a readable image ({str(e).strip().splitlines()[-1]}); remove or replace it") from e
    if img is None:
        raise DatasetError(f"{where}: not a readable image (corrupt or unsupported format); remove or replace it")
    try:
        return as_bgr(img)
    except ValueError as e:
        raise DatasetError(f"{where}: {e}") from e


def read_image(path: str | Path) -> np.ndarray:
    """Image file -> HxWx3 BGR uint8; a clear DatasetError for missing, unreadable or hostile files."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: image not found")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror}); check permissions") from e
    return decode_image(data, str(path))


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


def is_grey(frame: np.ndarray) -> bool:
    """One channel, or three equal ones (a grey camera saved as BGR)."""
    return frame.ndim == 2 or frame.shape[2] == 1 or bool(
        np.array_equal(frame[..., 0], frame[..., 1]) and np.array_equal(frame[..., 1], frame[..., 2]))


def class_folders(paths: list[str | Path]) -> list[Path]:
    """Given folders -> MVTec class folders: a folder holding train/good is itself a class; a parent whose
    sub-folders hold train/good stands for all of them (sorted), e.g. ``--data ../shared/data/mvtec_ad``."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "train" / "good").is_dir() or not p.is_dir():
            out.append(p)  # a class (or a missing folder: open_dataset says what is wrong)
            continue
        subs = sorted(c for c in p.iterdir() if (c / "train" / "good").is_dir())
        if not subs:
            raise DatasetError(f"{p}: neither a class folder (train/good) nor a parent of class folders; "
                               "pass the category folder that holds train/good, or their parent")
        out.extend(subs)
    return out


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
