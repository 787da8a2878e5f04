"""Accuracy of a trained model on an MVTec-layout test split, with the standard metrics."""
from __future__ import annotations

import dataclasses
import logging

import numpy as np

from calibration.metrics import auroc, evaluate
from runtime.dataset import open_dataset, read_mask

from .data import load_frames
from .loop import run_outputs
from .models.efficientad import EfficientAD

log = logging.getLogger(__name__)


def evaluate_model(model: EfficientAD, data: str, device: str = "cpu") -> dict:
    """Image AUROC / pixel AUROC / AUPRO / F1-max for EfficientAD alone and for PUAD,
    plus per-defect-type image AUROC (each defect type against the good test images)."""
    ds = open_dataset(data)
    size = model.cfg.image_size
    frames = load_frames([s.path for s in ds.test], size, "test images")
    labels = np.array([s.label for s in ds.test])
    masks = np.stack([read_mask(s, size, size) for s in ds.test])
    model = model.to(device).eval()
    out = run_outputs(model, frames, device, keys=("picturable_score", "unpicturable_score", "image_score", "anomaly_map"))
    maps = out["anomaly_map"][:, 0]
    result = {}
    for name, key in (("efficientad", "picturable_score"), ("puad", "image_score"), ("gaussian_only", "unpicturable_score")):
        with_pixels = key == "picturable_score"
        sc = evaluate(labels, out[key], masks if with_pixels else None, maps if with_pixels else None)
        d = dataclasses.asdict(sc)
        defects = [s.defect for s in ds.test]
        good = labels == 0
        d["per_defect_auroc"] = {
            t: auroc(np.r_[np.zeros(good.sum()), np.ones(sum(1 for x in defects if x == t))],
                     np.r_[out[key][good], out[key][np.array([x == t for x in defects])]])
            for t in ds.defect_types
        }
        result[name] = d
    # PUAD shares EfficientAD's map, so its pixel metrics are the same
    result["puad"]["pixel_auroc"] = result["efficientad"]["pixel_auroc"]
    result["puad"]["aupro"] = result["efficientad"]["aupro"]
    result["n_test"] = int(len(labels))
    return result
