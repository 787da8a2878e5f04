"""Labelled validation from good images alone: the validation frames plus defects painted on them.

Why: a user training on good parts has no defect images, and the test split must never choose a
setting. Defects painted on held-out good frames (``calibration.synthetic_defects``) give a labelled
set whose image/pixel metrics can rank options (map smoothing, a distortion, a noise strength).
One implementation for every chooser and benchmark that ranks on it.
"""
from __future__ import annotations

import numpy as np

from calibration.metrics import auroc, evaluate
from calibration.synthetic_defects import paint_defects

DEFECTS_PER_IMAGE = 3
LIGHT_GAINS = (0.9, 1.1)  # a 10 % darker and a 10 % brighter line


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
                       device: str = "cpu", light_gains: tuple[float, ...] = (), threshold: float | None = None) -> dict:
    """Image AUROC, pixel AUROC and AUPRO of the model's deployed outputs on the painted set, per image
    score it emits (``map_score``, ``image_score``); plus the set's size. With ``light_gains`` (e.g.
    ``LIGHT_GAINS``) also ``lighting``: the good frames relit by each gain, scored against the same painted set
    (``relit_goods``; ``threshold``, the calibrated image threshold, adds their false-alarm rate)."""
    from .loop import run_outputs

    frames, labels, gt = painted_set(val_frames, per_image, seed)
    keys = [k for k in ("map_score", "image_score") if k in model.output_names()]
    out = run_outputs(model, frames, device, keys=tuple(keys) + ("anomaly_map",))
    rows = {}
    for k in keys:
        sc = evaluate(labels, out[k], gt, out["anomaly_map"][:, 0])
        rows[k] = {"image_auroc": sc.image_auroc, "pixel_auroc": sc.pixel_auroc, "aupro": sc.aupro}
    result = {"n_good": int(len(val_frames)), "n_painted": int(len(frames) - len(val_frames)), **rows}
    if light_gains:
        scores = out["image_score"]
        result["lighting"] = relit_goods(model, val_frames, scores[labels == 0], scores[labels == 1], light_gains,
                                         device, threshold)
    return result


def relit_goods(model, val_frames: np.ndarray, as_taken: np.ndarray, painted: np.ndarray,
                gains: tuple[float, ...], device: str = "cpu", threshold: float | None = None) -> dict:
    """Would a change of light look like a defect? Per gain, on the good validation frames with their intensity
    scaled by it: ``vs_goods`` = image AUROC of the relit goods against the same goods as taken (``as_taken``, their
    image scores; 0.5: light alone moves no score, 1: every relit good part scores above every unchanged one);
    ``vs_painted`` = image AUROC of the painted defects (``painted``, their image scores, light as trained) against
    the relit goods; with ``threshold``, the relit goods' false-alarm rate. Painted validation alone cannot see this:
    its goods share the training images' light. ``image_auroc`` is the mean of ``vs_painted`` (higher is better)."""
    from .data import with_gain
    from .loop import run_outputs

    key = "image_score"
    per_gain = {}
    for g in gains:
        relit = run_outputs(model, with_gain(val_frames, g), device, keys=(key,))[key]
        row = {"vs_goods": float(auroc(np.r_[np.zeros(len(as_taken)), np.ones(len(relit))], np.r_[as_taken, relit])),
               "vs_painted": float(auroc(np.r_[np.zeros(len(relit)), np.ones(len(painted))], np.r_[relit, painted]))}
        if threshold is not None:
            row["false_alarm_rate"] = float(np.mean(relit > threshold))
        per_gain[str(g)] = row
    return {"image_auroc": float(np.mean([r["vs_painted"] for r in per_gain.values()])), "per_gain": per_gain,
            "n_good": int(len(val_frames)), "n_painted": int(len(painted))}
