"""Choose the anomaly-map smoothing on synthetic defects painted on held-out good images.

Why: how much to smooth the map is a trade between localisation (AUPRO, pixel AUROC)
and image AUROC, and the best value depends on the product and the model (bottle
models measured 0-8 px best depending on the input size). The test split must not
choose it, and a user training on good parts has no defect images; defects painted on
the validation images (``calibration.synthetic_defects``) give a labelled set from the
good images alone. Candidates are scored with the standard metrics; the objective is
the mean of image AUROC and AUPRO (ties go to the earlier candidate).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np

from calibration.metrics import evaluate

from .loop import fit_map_normalization, raw_outputs, rescore
from .models.base import AnomalyModel
from .painted_validation import DEFECTS_PER_IMAGE, painted_set

log = logging.getLogger(__name__)

SMOOTHING_CANDIDATES = (0.0, 2.0, 4.0, 6.0, 8.0, 12.0)  # sigma in px at the 256 px scale


@dataclass
class SmoothingChoice:
    sigma: float
    rows: list[dict]  # per candidate: sigma, image/pixel AUROC, AUPRO, objective on the synthetic set
    n_good: int
    n_defect: int
    seed: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def choose_map_smoothing(model: AnomalyModel, val_frames: np.ndarray, device: str = "cpu",
                         candidates: tuple[float, ...] = SMOOTHING_CANDIDATES,
                         per_image: int = DEFECTS_PER_IMAGE, seed: int = 0) -> SmoothingChoice:
    """Score every candidate sigma on the validation frames plus defects painted on them; leave the
    model set to the best one. Re-run the full calibration afterwards (the score normalization
    and threshold depend on the smoothing)."""
    if len(val_frames) < 2:
        raise ValueError(f"choosing the map smoothing needs at least 2 validation images, got {len(val_frames)}")
    if not candidates:
        raise ValueError("no smoothing candidates given")
    frames, labels, gt = painted_set(val_frames, per_image, seed)
    n_defect = len(frames) - len(val_frames)
    raw = raw_outputs(model, frames, device)  # the networks run once; each candidate only re-scores
    n = len(val_frames)
    fit_map_normalization(model, {k: v[:n] for k, v in raw.items()})
    rows = []
    for sigma in candidates:
        model.set_map_smoothing(float(sigma))
        out = rescore(model, raw, device, keys=("map_score", "anomaly_map"))
        sc = evaluate(labels, out["map_score"], gt, out["anomaly_map"][:, 0])
        row = {"sigma_px_at_256": float(sigma), "image_auroc": sc.image_auroc, "pixel_auroc": sc.pixel_auroc,
               "aupro": sc.aupro, "objective": (sc.image_auroc + sc.aupro) / 2}
        log.info("map smoothing %.1f px: synthetic image AUROC %.4f, pixel AUROC %.4f, AUPRO %.4f",
                 sigma, sc.image_auroc, sc.pixel_auroc, sc.aupro)
        rows.append(row)
    best = max(range(len(rows)), key=lambda i: (rows[i]["objective"], -i))
    model.set_map_smoothing(rows[best]["sigma_px_at_256"])
    log.info("map smoothing chosen on %d good + %d painted validation images: %.1f px",
             len(val_frames), n_defect, rows[best]["sigma_px_at_256"])
    return SmoothingChoice(rows[best]["sigma_px_at_256"], rows, len(val_frames), n_defect, seed)
