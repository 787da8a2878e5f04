"""Drift: do today's good parts score like the good parts the model was calibrated on?

A changed light, a dirty or refocused lens, a new batch of material shifts good-image
scores before it raises alarms; the threshold sits ~2-3 standard deviations above the
calibration mean, so a shift of one standard deviation multiplies the false-alarm rate.
``calibration fit`` stores the good-score statistics (``reference_stats``) in the sidecar
(``provenance["calibration"]["good_scores"]``); ``calibration report`` compares today's good
images with them (``check``) and warns with the numbers.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MEAN_SHIFT_SIGMA = 1.0  # flag when today's mean is this many calibration std away
STD_RATIO = 2.0  # flag when today's spread is this many times the calibration spread
MIN_IMAGES = 5  # fewer good images cannot tell drift from chance
QUANTILES = (0.05, 0.5, 0.95, 0.99)


def reference_stats(good_scores: np.ndarray) -> dict[str, float | int]:
    """Statistics of good-image scores (float [N]) at calibration, JSON-ready, for the sidecar."""
    s = np.asarray(good_scores, np.float64).reshape(-1)
    s = s[np.isfinite(s)]
    if len(s) == 0:
        return {"n": 0}
    q = np.quantile(s, QUANTILES)
    return {"n": int(len(s)), "mean": float(s.mean()), "std": float(s.std()),
            **{f"q{int(round(p * 100)):02d}": float(v) for p, v in zip(QUANTILES, q)}}


def _valid_reference(ref: Any) -> bool:
    if not isinstance(ref, dict):
        return False
    vals = [ref.get(k) for k in ("n", "mean", "std")]
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vals) \
        and ref["n"] >= MIN_IMAGES and ref["std"] > 0


def check(reference: Any, scores: np.ndarray, threshold: float | None = None) -> dict[str, Any]:
    """Compare today's good-image scores (float [N]) with the calibration reference.

    Returns a JSON-ready dict: ``flagged`` (bool), ``reasons`` (one line each), the numbers
    (``mean_shift_sigma``: (mean today - mean then) / std then; ``std_ratio``; ``above_q99``:
    share of today's images above the calibration 99th percentile, expected ~0.01), or
    ``status`` saying why no verdict was possible.
    """
    s = np.asarray(scores, np.float64).reshape(-1)
    s = s[np.isfinite(s)]
    if not _valid_reference(reference):
        return {"flagged": False, "status": "no reference: the model was calibrated before drift statistics were "
                                            "stored; run `python -m calibration fit` once to record them"}
    if len(s) < MIN_IMAGES:
        return {"flagged": False, "status": f"{len(s)} good images: too few to judge drift (give {MIN_IMAGES} or more)"}
    mean, std = float(s.mean()), float(s.std())
    shift = (mean - reference["mean"]) / reference["std"]
    ratio = std / reference["std"]
    out: dict[str, Any] = {"n": int(len(s)), "mean": mean, "std": std, "reference": reference,
                           "mean_shift_sigma": round(shift, 3), "std_ratio": round(ratio, 3)}
    q99 = reference.get("q99")
    if isinstance(q99, (int, float)) and math.isfinite(q99):
        out["above_q99"] = round(float((s > q99).mean()), 4)
    reasons = []
    if abs(shift) > MEAN_SHIFT_SIGMA:
        reasons.append(f"good images score {'higher' if shift > 0 else 'lower'} than at calibration: mean {mean:.4g} "
                       f"vs {reference['mean']:.4g} ± {reference['std']:.3g} ({shift:+.1f} sigma)")
    if ratio > STD_RATIO:
        reasons.append(f"good-image scores spread {ratio:.1f}x wider than at calibration (std {std:.3g} vs "
                       f"{reference['std']:.3g})")
    out["flagged"] = bool(reasons)
    out["reasons"] = reasons
    if threshold is not None and math.isfinite(threshold):
        out["observed_fpr"] = round(float((s >= threshold).mean()), 4)
    return out


def warn(result: dict[str, Any], where: str) -> None:
    """Log the drift verdict: one WARNING with the numbers when flagged."""
    if result.get("flagged"):
        extra = f"; {result['observed_fpr']:.0%} of them above the OK/NG threshold" if "observed_fpr" in result else ""
        log.warning("drift on %s: %s%s. Check light, lens, focus and camera settings; if the change is intended, "
                    "recalibrate with `python -m calibration fit`", where, "; ".join(result["reasons"]), extra)
    elif "status" in result:
        log.info("drift not checked: %s", result["status"])
