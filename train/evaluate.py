"""Accuracy of a trained model on an MVTec-layout test split: the standard metrics, and the
deployed OK/NG figures at the model's calibrated threshold. Any family."""
from __future__ import annotations

import dataclasses
import logging

import numpy as np

from calibration.metrics import auroc, evaluate
from runtime.dataset import open_dataset, read_mask

from .data import load_frames
from .loop import run_outputs
from .models.base import AnomalyModel

log = logging.getLogger(__name__)


def deployed_decisions(scores: np.ndarray, labels: np.ndarray, defects: list[str], threshold: float) -> dict:
    """OK/NG at ``threshold``: false alarms on good test images, misses per defect type."""
    ng = scores >= threshold
    good = labels == 0
    misses = {}
    for t in sorted(set(d for d, lab in zip(defects, labels) if lab == 1)):
        sel = np.array([d == t for d in defects])
        misses[t] = {"missed": int((~ng[sel]).sum()), "of": int(sel.sum())}
    return {"threshold": float(threshold), "false_alarms": int(ng[good].sum()), "good": int(good.sum()),
            "false_alarm_rate": float(ng[good].mean()) if good.any() else None,
            "missed": int((~ng[~good]).sum()), "defective": int((~good).sum()),
            "miss_rate": float((~ng[~good]).mean()) if (~good).any() else None, "misses_per_defect": misses}


def evaluate_model(model: AnomalyModel, data: str, device: str = "cpu", threshold: float | None = None,
                   fit: str = "stretch") -> dict:
    """Image AUROC / pixel AUROC / AUPRO / F1-max for the deployed image score and each component
    score (map score; the Gaussian score where the family has one), per-defect-type image AUROC,
    and, given the calibrated ``threshold``, the OK/NG figures."""
    ds = open_dataset(data)
    h, w = model.cfg.height, model.cfg.width
    frames = load_frames([s.path for s in ds.test], (h, w), "test images", fit)
    labels = np.array([s.label for s in ds.test])
    masks = np.stack([read_mask(s, h, w, fit) for s in ds.test])
    model = model.to(device).eval()
    keys = tuple(k for k in ("map_score", "gaussian_score", "image_score") if k in model.output_names())
    out = run_outputs(model, frames, device, keys=keys + ("anomaly_map",))
    maps = out["anomaly_map"][:, 0]
    defects = [s.defect for s in ds.test]
    good = labels == 0
    result = {}
    for key in keys:
        with_pixels = key != "gaussian_score"
        sc = evaluate(labels, out[key], masks if with_pixels else None, maps if with_pixels else None)
        d = dataclasses.asdict(sc)
        d["per_defect_auroc"] = {
            t: auroc(np.r_[np.zeros(good.sum()), np.ones(sum(1 for x in defects if x == t))],
                     np.r_[out[key][good], out[key][np.array([x == t for x in defects])]])
            for t in ds.defect_types
        }
        result[key] = d
    if threshold is not None:
        result["deployed"] = deployed_decisions(out["image_score"], labels, defects, threshold)
    result["n_test"] = int(len(labels))
    return result
