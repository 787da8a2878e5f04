"""Anomaly-detection metrics as the MVTec papers define them, in numpy.

- image / pixel AUROC: area under the ROC curve (Mann-Whitney statistic, ties count half);
- AUPRO: per-region overlap averaged over every connected ground-truth region,
  integrated over the false-positive rate from 0 to ``fpr_limit`` (0.3) and divided by it,
  as in the MVTec AD evaluation code (FPR over all defect-free pixels of the test set);
- F1-max: best F1 over all thresholds, with that threshold.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """labels: {0,1} array; scores: float array of the same size (higher = more anomalous)."""
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both positive and negative samples")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    # average ranks over ties (1-based)
    ranks = np.empty(len(s), np.float64)
    boundaries = np.flatnonzero(np.diff(s)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(s)]])
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over thresholds ``score >= t``; returns (f1, t)."""
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.sum() == 0:
        raise ValueError("F1 needs at least one positive sample")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct threshold
    tp, fp, thr = tp[last], fp[last], s[last]
    precision = tp / (tp + fp)
    recall = tp / labels.sum()
    f1 = np.where(tp > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
    k = int(np.argmax(f1))
    return float(f1[k]), float(thr[k])


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """masks: [N,H,W] bool ground truth; maps: [N,H,W] float anomaly maps. Normalized to [0,1]."""
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float64)
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape")
    n_ok = int((~masks).sum())
    if n_ok == 0 or masks.sum() == 0:
        raise ValueError("AUPRO needs both defect and defect-free pixels")
    # weight of each pixel toward FPR (normal pixels) and toward mean PRO (defect pixels)
    fp_w = (~masks).astype(np.float64) / n_ok
    pro_w = np.zeros(masks.shape, np.float64)
    n_regions = 0
    for i in range(len(masks)):
        if not masks[i].any():
            continue
        count, comp = cv2.connectedComponents(masks[i].astype(np.uint8), connectivity=8)
        for c in range(1, count):
            region = comp == c
            pro_w[i][region] = 1.0 / region.sum()
            n_regions += 1
    pro_w /= n_regions
    flat = maps.ravel()
    order = np.argsort(-flat, kind="mergesort")
    s = flat[order]
    fpr = np.cumsum(fp_w.ravel()[order])
    pro = np.cumsum(pro_w.ravel()[order])
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    fpr = np.r_[0.0, fpr[last]]
    pro = np.r_[0.0, pro[last]]
    fpr = np.minimum(fpr, 1.0)
    # integrate up to fpr_limit, interpolating the last segment
    k = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:k], pro[:k]
    if k < len(fpr) and x[-1] < fpr_limit:
        x0, x1, y0, y1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x, y = np.r_[x, fpr_limit], np.r_[y, y_lim]
    return float(np.trapezoid(y, x) / fpr_limit)


@dataclass
class Scores:
    image_auroc: float
    pixel_auroc: float | None
    aupro: float | None
    f1_max: float
    f1_threshold: float


def evaluate(labels: np.ndarray, image_scores: np.ndarray, masks: np.ndarray | None = None,
             maps: np.ndarray | None = None, fpr_limit: float = 0.3) -> Scores:
    """All standard metrics at once; pixel metrics only when masks and maps are given."""
    f1, thr = f1_max(labels, image_scores)
    pa = ap = None
    if masks is not None and maps is not None:
        pa = auroc(masks, maps)
        ap = aupro(masks, maps, fpr_limit)
    return Scores(auroc(labels, image_scores), pa, ap, f1, thr)
