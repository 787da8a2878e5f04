"""The statistics behind every decision constant, in numpy + scikit-learn.

Used by training (first fit) and by field calibration (refit from a deployed model),
so both produce the same constants from the same data.
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

    Mahalanobis distance is then ||(f - mean) @ whitener||, one matmul in the graph.
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


def mahalanobis(features: np.ndarray, g: GaussianFit) -> np.ndarray:
    """[N,D] -> [N] distances (same formula as the graph)."""
    z = (np.asarray(features, np.float64) - g.mean) @ g.whitener
    return np.sqrt((z * z).sum(1) + 1e-12)


def map_quantiles(st_maps: np.ndarray, ae_maps: np.ndarray, qa: float = 0.9, qb: float = 0.995) -> Normalization:
    """Raw maps of held-out good images ([N,...] each) -> EfficientAD's q_a/q_b per map."""
    st = np.asarray(st_maps, np.float64).ravel()
    ae = np.asarray(ae_maps, np.float64).ravel()
    if st.size == 0:
        raise CalibrationError("no maps to compute quantiles from")
    q_st = np.quantile(st, [qa, qb])
    q_ae = np.quantile(ae, [qa, qb])
    n = len(st_maps)
    return Normalization(float(q_st[0]), float(q_st[1]), float(q_ae[0]), float(q_ae[1]), qa, qb, n)


def score_normalization(picturable: np.ndarray, unpicturable: np.ndarray, weight: float = 0.5,
                        gate: float | None = None) -> ScoreSpec:
    """z-normalize both scores on good images; the PUAD weight mixes them, the gate (in
    standard deviations, ``None`` = plain sum) says where the unpicturable score starts to count."""
    if not 0.0 <= weight <= 1.0:
        raise CalibrationError(f"PUAD weight {weight} must lie in [0, 1]")
    if gate is not None and not np.isfinite(gate):
        raise CalibrationError(f"PUAD gate {gate} must be a finite number of standard deviations (or none)")
    p, u = np.asarray(picturable, np.float64), np.asarray(unpicturable, np.float64)
    return ScoreSpec(float(p.mean()), float(max(p.std(), 1e-6)), float(u.mean()), float(max(u.std(), 1e-6)), weight,
                     None if gate is None else float(gate))


def score_constants(spec: ScoreSpec) -> tuple[np.ndarray, np.ndarray]:
    """(score_center [2], score_weight [2]) as the graph uses them:
    image = d_p + max(d_u, 0) with d = (score - center) * weight.

    The gate moves the unpicturable centre to mean + gate * std. Without a gate the centre
    is 0: a Mahalanobis distance is never negative, so max(d_u, 0) = d_u and the graph
    computes the plain weighted sum (shifted by a constant the threshold absorbs).
    """
    gate = spec.puad_gate
    u_center = 0.0 if gate is None else spec.unpicturable_mean + gate * spec.unpicturable_std
    center = np.array([spec.picturable_mean, u_center])
    weight = np.array([(1 - spec.puad_weight) / spec.picturable_std, spec.puad_weight / spec.unpicturable_std])
    return center, weight


def gated_sum(picturable, unpicturable, center: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The graph's image score from its two constants, in numpy: d_p + max(d_u, 0)."""
    both = np.stack([np.atleast_1d(np.asarray(picturable, np.float64)),
                     np.atleast_1d(np.asarray(unpicturable, np.float64))], 1)
    d = (both - np.asarray(center, np.float64)) * np.asarray(weight, np.float64)
    return d[:, 0] + np.maximum(d[:, 1], 0.0)


def combine_scores(picturable: np.ndarray, unpicturable: np.ndarray, spec: ScoreSpec) -> np.ndarray:
    """The graph's image score for a score spec (see ``score_constants``)."""
    return gated_sum(picturable, unpicturable, *score_constants(spec))


def threshold_at_fpr(good_scores: np.ndarray, target_fpr: float) -> Thresholds:
    """Smallest threshold whose false-positive rate on these good images is <= target_fpr."""
    s = np.sort(np.asarray(good_scores, np.float64))
    if len(s) == 0:
        raise CalibrationError("no good-image scores to set a threshold on")
    if not 0.0 <= target_fpr < 1.0:
        raise CalibrationError(f"target FPR {target_fpr} must lie in [0, 1)")
    k = int(np.ceil(len(s) * (1 - target_fpr))) - 1  # allowed positives: floor(n*fpr)
    k = min(max(k, 0), len(s) - 1)
    thr = float(np.nextafter(s[k], np.inf))  # NG iff score >= thr
    fpr = float((s >= thr).mean())
    return Thresholds(image=thr, method="target_fpr", target_fpr=target_fpr, expected_fpr=fpr)


def threshold_f1(good_scores: np.ndarray, defect_scores: np.ndarray) -> Thresholds:
    """Threshold at F1-max over labelled good and defect images."""
    from .metrics import f1_max

    g, d = np.asarray(good_scores, np.float64), np.asarray(defect_scores, np.float64)
    labels = np.r_[np.zeros(len(g)), np.ones(len(d))]
    _, thr = f1_max(labels, np.r_[g, d])
    return Thresholds(image=float(thr), method="f1_max", expected_fpr=float((g >= thr).mean()))
