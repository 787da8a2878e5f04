"""Fit every constant of the shared deploy head from good images: ONE procedure for training and field.

Inputs are what the networks produced for good images (raw maps ``[N,K,h,w]``, pooled features
``[N,D]`` when the family has a Gaussian component). Scores are never re-computed here: a
``Scorer`` runs the post-network part of the model itself with candidate constants -- in the field
the exported graph's own subgraph (``calibration.graph_part``), at training time the torch head the
graph is exported from. So the thresholds are set on exactly the scores the deployed model produces.

Procedure (field: all from the same good images):

1. map quantiles q_a/q_b per raw map -> ``map_scale``/``map_shift``;
2. Gaussian on the features; the good images' Gaussian scores are taken out-of-sample (2-fold:
   each half scored with the Gaussian of the other half), since an image's own features pull the
   mean and covariance towards it; the deployed Gaussian is fit on all images;
3. score normalization (mean/std of each component score) and the PUAD gate -> ``score_center``,
   ``score_weight``;
4. the threshold at the target FPR on the held-out image scores (or at F1-max with labelled defects);
   the deployed model's scores of the calibration images and their FPR are reported beside it.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np

from runtime.artifact import GaussianInfo, Normalization, ScoreSpec, Thresholds

from . import fitting
from .fitting import CalibrationError
from .layout import LAYOUT_MIN, has_layout

log = logging.getLogger(__name__)

# scorer(constants, raw_maps [N,K,h,w], features [N,D] or None) -> {"map_score", "image_score"[, "gaussian_score"]}
Scorer = Callable[[dict[str, np.ndarray], np.ndarray, "np.ndarray | None"], dict[str, np.ndarray]]


@dataclass
class HeadFit:
    constants: dict[str, np.ndarray]  # float32, by initializer name
    normalization: Normalization
    gaussian: GaussianInfo
    score: ScoreSpec
    thresholds: Thresholds
    n_images: int
    good_scores: np.ndarray  # the deployed model's image scores of the calibration images (constants as fitted)
    heldout_scores: np.ndarray  # out-of-sample image scores the threshold was set on
    defect_scores: np.ndarray | None


def gaussian_optional(family_params: dict | None) -> bool:
    """Whether the graph's Gaussian score may be switched off when too few good images are given
    (``family_params["gaussian"]["optional"]``, declared by families whose map works from a handful)."""
    return bool(((family_params or {}).get("gaussian") or {}).get("optional", False))


def _halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    idx = np.random.default_rng(seed).permutation(n)
    return idx[: n // 2], idx[n // 2:]


def fit_head(raw_maps: np.ndarray, features: np.ndarray | None, scorer: Scorer, map_names: list[str],
             puad_weight: float = 0.5, puad_gate: float | None = fitting.DEFAULT_PUAD_GATE, target_fpr: float = 0.01,
             gaussian_features: np.ndarray | None = None, defects: tuple[np.ndarray, np.ndarray | None] | None = None,
             estimator: str = "ledoit_wolf", gaussian_optional: bool = False, layout: float | None = None) -> HeadFit:
    """All head constants from good images' raw outputs (see the module docstring).

    gaussian_features: fit the Gaussian on these instead (training: the training images, while
    ``raw_maps``/``features`` come from held-out validation images, which are then out-of-sample
    already). defects: (raw maps, features) of labelled defect images -> threshold at F1-max.
    layout: the good images' ``calibration.layout.layout_fraction`` when the Gaussian follows the layout:
    below ``LAYOUT_MIN`` (a texture) it is switched off.
    """
    raw_maps = np.asarray(raw_maps, np.float32)
    n = len(raw_maps)
    has_gaussian = features is not None
    if n < 2:
        raise CalibrationError(f"{n} good image(s): give at least 2 (better 20 or more)")
    norm = fitting.map_quantiles(raw_maps, map_names)
    scale, shift = fitting.map_affine(norm)
    consts = {"map_scale": scale.astype(np.float32), "map_shift": shift.astype(np.float32)}
    unit_center, unit_weight = (np.zeros(2), np.ones(2)) if has_gaussian else (np.zeros(1), np.ones(1))

    def with_(**kw) -> dict[str, np.ndarray]:
        out = dict(consts)
        out.update({k: np.asarray(v, np.float32) for k, v in kw.items()})
        return out

    if has_gaussian:
        features = np.asarray(features, np.float32)
        need = fitting.required_images(features.shape[1])
        n_gauss = len(gaussian_features) if gaussian_features is not None else n // 2  # 2-fold: each half fits one
        off = ""
        if layout is not None and not has_layout(layout):
            off = f"no layout: {layout:.3f} of the feature variance is tied to position (a texture), under {LAYOUT_MIN:g}"
            log.info("Gaussian (logical-anomaly) score off: %s", off)
        elif gaussian_optional and n_gauss < need:
            off = f"{n} good images, {need if gaussian_features is not None else 2 * need} needed"
            log.warning("%d good images: too few for the %d-dimensional Gaussian (logical-anomaly) score, which is off; "
                        "calibrate with at least %d good images to turn it on", n, features.shape[1],
                        need if gaussian_features is not None else 2 * need)
        if off:
            g_all = fitting.GaussianFit(features.mean(0).astype(np.float64), np.eye(features.shape[1]),
                                        GaussianInfo(dim=int(features.shape[1]), n_images=0, estimator="off",
                                                     layout=layout, off_reason=off, weight_when_on=float(puad_weight)))
            folds = [(np.arange(n), g_all)]
            puad_weight = 0.0
        elif gaussian_features is not None:
            g_all = fitting.fit_gaussian(gaussian_features, estimator)
            folds = [(np.arange(n), g_all)]  # scored images are held out from the Gaussian already
        else:
            if n < 2 * need:  # 2-fold: each half must carry a Gaussian
                raise CalibrationError(f"{n} good images are too few for {features.shape[1]}-dimensional features; "
                                       f"give at least {2 * need}")
            a, b = _halves(n)
            folds = [(b, fitting.fit_gaussian(features[a], estimator)), (a, fitting.fit_gaussian(features[b], estimator))]
            g_all = fitting.fit_gaussian(features, estimator)
        gauss = lambda g: {"gaussian_mean": g.mean, "gaussian_whitener": g.whitener}  # noqa: E731
        map_s, gauss_s = np.empty(n), np.empty(n)
        for idx, g in folds:
            out = scorer(with_(**gauss(g), score_center=unit_center, score_weight=unit_weight), raw_maps[idx], features[idx])
            map_s[idx], gauss_s[idx] = out["map_score"], out["gaussian_score"]
        spec = fitting.score_normalization(map_s, gauss_s, puad_weight, puad_gate)
        center, weight = fitting.score_constants(spec, True)
        heldout = np.empty(n)
        for idx, g in folds:
            heldout[idx] = scorer(with_(**gauss(g), score_center=center, score_weight=weight), raw_maps[idx],
                                  features[idx])["image_score"]
        final = with_(**gauss(g_all), score_center=center, score_weight=weight)
        ginfo = g_all.info if layout is None else dataclasses.replace(g_all.info, layout=float(layout))
    else:
        map_s = scorer(with_(score_center=unit_center[:1], score_weight=unit_weight[:1]), raw_maps, None)["map_score"]
        spec = fitting.score_normalization(map_s, None)
        center, weight = fitting.score_constants(spec, False)
        final = with_(score_center=center, score_weight=weight)
        heldout = None
        ginfo = GaussianInfo()
    good = np.asarray(scorer(final, raw_maps, features)["image_score"], np.float64)
    if heldout is None:
        heldout = good  # no fitted component depends on the individual image beyond the quantiles
    defect_scores = None
    if defects is not None and len(defects[0]):
        defect_scores = np.asarray(scorer(final, np.asarray(defects[0], np.float32),
                                          None if defects[1] is None else np.asarray(defects[1], np.float32))["image_score"],
                                   np.float64)
        thr = fitting.threshold_f1(heldout, defect_scores)
    else:
        thr = fitting.threshold_at_fpr(heldout, target_fpr)
    thr.fit_fpr = float((good >= thr.image).mean())
    return HeadFit({k: np.asarray(v, np.float32) for k, v in final.items()}, norm, ginfo, spec, thr, n, good,
                   np.asarray(heldout, np.float64), defect_scores)
