"""Labelled validation from good images alone: the validation frames plus defects painted on them.

Why: a user training on good parts has no defect images, and the test split must never choose a
setting. Defects painted on held-out good frames (``calibration.synthetic_defects``) give a labelled
set whose image/pixel metrics can rank options (map smoothing, a distortion, a noise strength).
One implementation for every chooser and benchmark that ranks on it.
"""
from __future__ import annotations

import numpy as np

from calibration.metrics import evaluate
from calibration.synthetic_defects import paint_defects

DEFECTS_PER_IMAGE = 3


def painted_set(val_frames: np.ndarray, per_image: int = DEFECTS_PER_IMAGE,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 good frames [N,H,W,3] -> (good + painted frames, labels 0/1 int64, masks uint8 [M,H,W])."""
    if len(val_frames) < 2:
        raise ValueError(f"painted validation needs at least 2 validation images, got {len(val_frames)}; "
                         "add good images or lower the validation split")
    defects, masks, _ = paint_defects(val_frames, per_image, seed)
    frames = np.concatenate([val_frames, defects])
    labels = np.r_[np.zeros(len(val_frames)), np.ones(len(defects))].astype(np.int64)
    gt = np.concatenate([np.zeros(val_frames.shape[:3], np.uint8), masks])
    return frames, labels, gt


def painted_validation(model, val_frames: np.ndarray, per_image: int = DEFECTS_PER_IMAGE, seed: int = 0,
                       device: str = "cpu") -> dict:
    """Image AUROC, pixel AUROC and AUPRO of the model's deployed outputs on the painted set, per image
    score it emits (``map_score``, ``image_score``); plus the set's size."""
    from .loop import run_outputs

    frames, labels, gt = painted_set(val_frames, per_image, seed)
    keys = [k for k in ("map_score", "image_score") if k in model.output_names()]
    out = run_outputs(model, frames, device, keys=tuple(keys) + ("anomaly_map",))
    rows = {}
    for k in keys:
        sc = evaluate(labels, out[k], gt, out["anomaly_map"][:, 0])
        rows[k] = {"image_auroc": sc.image_auroc, "pixel_auroc": sc.pixel_auroc, "aupro": sc.aupro}
    return {"n_good": int(len(val_frames)), "n_painted": int(len(frames) - len(val_frames)), **rows}
