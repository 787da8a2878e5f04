"""The statistics behind every decision constant, in numpy + scikit-learn.

Only statistics live here (quantiles, the Gaussian fit, score normalization, thresholds);
scores are never re-computed here: ``calibration.headfit`` gets them from the deployed
graph's own post-network part (or, at training time, from the same torch head).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from runtime.artifact import GaussianInfo, Normalization, ScoreSpec, Thresholds


DEFAULT_PUAD_GATE = 2.0  # z of the Gaussian score where it starts to count (chosen on held-out data)
# "leave the model's PUAD gate as it is" (None already means "no gate"). Not a string, so
# argparse hands it through as a default instead of parsing it.
KEEP_GATE = object()


def parse_gate(text: str) -> float | None:
    """CLI value of ``--puad-gate``: a number of standard deviations, or none/off for the plain sum."""
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of standard deviations (e.g. 2) or none") from None


class CalibrationError(ValueError):
    """Data that cannot give trustworthy constants; the message says what is needed."""


def required_images(dim: int) -> int:
    """Fewest good images for a shrunk covariance of ``dim`` features we still trust."""
    return max(16, dim // 8)


@dataclass
class GaussianFit:
    mean: np.ndarray  # float64 [D]
    whitener: np.ndarray  # float64 [D,D], lower Cholesky factor L of the precision: P = L L^T
    info: GaussianInfo


def fit_gaussian(features: np.ndarray, estimator: str = "ledoit_wolf") -> GaussianFit:
    """features: float [N,D] pooled features of good images -> mean and whitener.

    The deploy head's Mahalanobis distance is then ||(f - mean) @ whitener||, one matmul.
    """
    from sklearn.covariance import OAS, LedoitWolf

    x = np.asarray(features, np.float64)
    if x.ndim != 2:
        raise CalibrationError(f"features must be [N,D], got shape {x.shape}")
    n, d = x.shape
    need = required_images(d)
    if n < need:
        raise CalibrationError(f"{n} good images are too few for {d}-dimensional features; give at least {need}")
    if not np.isfinite(x).all():
        raise CalibrationError("features contain NaN/Inf; the model output is broken - re-export it")
    if np.allclose(x.std(0), 0):
        raise CalibrationError("all good images give identical features (degenerate covariance); use varied images")
    est = {"ledoit_wolf": LedoitWolf, "oas": OAS}.get(estimator)
    if est is None:
        raise CalibrationError(f"estimator {estimator!r}: choose ledoit_wolf or oas")
    fit = est(store_precision=False, assume_centered=False).fit(x)
    cov = fit.covariance_
    evals = np.linalg.eigvalsh(cov)
    if evals[0] <= 0 or not np.isfinite(evals).all():
        raise CalibrationError("covariance is singular even after shrinkage; use more, more varied good images")
    cond = float(evals[-1] / evals[0])
    precision = np.linalg.inv(cov)
    precision = (precision + precision.T) / 2
    whitener = np.linalg.cholesky(precision)
    info = GaussianInfo(dim=d, n_images=n, estimator=estimator, shrinkage=float(fit.shrinkage_), condition_number=cond)
    return GaussianFit(fit.location_, whitener, info)


MAP_LEVEL = 0.1  # value of the normalized map at the q_b quantile of good images (the convention of Batzner et al.)


def map_quantiles(raw_maps: np.ndarray, map_names: list[str] | tuple[str, ...], qa: float = 0.9,
                  qb: float = 0.995) -> Normalization:
    """Raw maps of good images [N,K,h,w] -> q_a/q_b of each of the K maps over all pixels."""
    m = np.asarray(raw_maps, np.float64)
    if m.ndim != 4 or m.shape[0] == 0:
        raise CalibrationError(f"raw maps must be [N,K,h,w] with N >= 1, got shape {m.shape}")
    if m.shape[1] != len(map_names):
        raise CalibrationError(f"model has {m.shape[1]} raw maps but its sidecar names {len(map_names)}; re-export it")
    if not np.isfinite(m).all():
        raise CalibrationError("raw maps contain NaN/Inf; the model output is broken - re-export it")
    lo, hi = [], []
    for k in range(m.shape[1]):
        q = np.quantile(m[:, k].ravel(), [qa, qb])
        lo.append(float(q[0]))
        hi.append(float(q[1]))
    return Normalization(list(map_names), lo, hi, qa, qb, int(m.shape[0]))


def map_affine(norm: Normalization) -> tuple[np.ndarray, np.ndarray]:
    """(map_scale [K], map_shift [K]) of the head: map k -> 0 at q_a, MAP_LEVEL at q_b, maps averaged."""
    k = len(norm.q_low)
    span = np.maximum(np.asarray(norm.q_high, np.float64) - np.asarray(norm.q_low, np.float64), 1e-12)
    scale = MAP_LEVEL / (k * span)
    return scale, -scale * np.asarray(norm.q_low, np.float64)


def score_normalization(map_scores: np.ndarray, gaussian_scores: np.ndarray | None, weight: float = 0.5,
                        gate: float | None = None) -> ScoreSpec:
    """z-normalize the component scores on good images; the PUAD weight mixes them, the gate (in
    standard deviations, ``None`` = plain sum) says where the Gaussian score starts to count."""
    if not 0.0 <= weight <= 1.0:
        raise CalibrationError(f"PUAD weight {weight} must lie in [0, 1]")
    if gate is not None and not np.isfinite(gate):
        raise CalibrationError(f"PUAD gate {gate} must be a finite number of standard deviations (or none)")
    p = np.asarray(map_scores, np.float64)
    if gaussian_scores is None:
        return ScoreSpec(float(p.mean()), float(max(p.std(), 1e-6)), 0.0, 1.0, 0.0, None)
    u = np.asarray(gaussian_scores, np.float64)
    return ScoreSpec(float(p.mean()), float(max(p.std(), 1e-6)), float(u.mean()), float(max(u.std(), 1e-6)), weight,
                     None if gate is None else float(gate))


def score_constants(spec: ScoreSpec, has_gaussian: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(score_center, score_weight) as the head uses them: image = d_0 + max(d_1, 0) with
    d = (scores - center) * weight ([1] each without a Gaussian: image = d_0).

    The gate moves the Gaussian centre to mean + gate * std. Without a gate the centre is 0:
    a Mahalanobis distance is never negative, so max(d_1, 0) = d_1 and the head computes the
    plain weighted sum (shifted by a constant the threshold absorbs).
    """
    if not has_gaussian:
        return np.array([spec.map_mean]), np.array([1.0 / spec.map_std])
    gate = spec.puad_gate
    u_center = 0.0 if gate is None else spec.gaussian_mean + gate * spec.gaussian_std
    center = np.array([spec.map_mean, u_center])
    weight = np.array([(1 - spec.puad_weight) / spec.map_std, spec.puad_weight / spec.gaussian_std])
    return center, weight


def threshold_at_fpr(good_scores: np.ndarray, target_fpr: float) -> Thresholds:
    """Smallest threshold whose false-positive rate on these good images is <= target_fpr."""
    s = np.sort(np.asarray(good_scores, np.float64))
    if len(s) == 0:
        raise CalibrationError("no good-image scores to set a threshold on")
    if not 0.0 <= target_fpr < 1.0:
        raise CalibrationError(f"target FPR {target_fpr} must lie in [0, 1)")
    k = int(np.ceil(len(s) * (1 - target_fpr))) - 1  # allowed positives: floor(n*fpr)
    k = min(max(k, 0), len(s) - 1)
    # NG iff score >= thr. The graph's scores are float32 and runtimes compare them in float32 (numpy casts a
    # Python float to the array's dtype): the threshold is the next float32 above, so both precisions agree
    thr = float(np.nextafter(np.float32(s[k]), np.float32(np.inf)))
    fpr = float((s >= thr).mean())
    return Thresholds(image=thr, method="target_fpr", target_fpr=target_fpr, expected_fpr=fpr)


def threshold_f1(good_scores: np.ndarray, defect_scores: np.ndarray) -> Thresholds:
    """Threshold at F1-max over labelled good and defect images."""
    from .metrics import f1_max

    g, d = np.asarray(good_scores, np.float64), np.asarray(defect_scores, np.float64)
    labels = np.r_[np.zeros(len(g)), np.ones(len(d))]
    _, thr = f1_max(labels, np.r_[g, d])
    return Thresholds(image=float(thr), method="f1_max", expected_fpr=float((g >= thr).mean()))
