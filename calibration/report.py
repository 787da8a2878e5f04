"""Calibration report: how the deployed model scores good (and defect) images right now."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from runtime.artifact import atomic_write_text
from runtime.model import Model

from . import drift
from .field import batched, iter_images
from .metrics import auroc

log = logging.getLogger(__name__)


def _scores(model: Model, source: str, max_images: int | None) -> np.ndarray:
    out = [model.predict(chunk).image_score for chunk in batched(iter_images(source, max_images), 8)]
    return np.concatenate(out) if out else np.empty(0)


def verdict(n_good: int, false_alarms: int, per_defect: dict[str, dict]) -> str:
    """One line an operator reads: how many good parts passed and how many defective ones were caught."""
    n_def = sum(v["of"] for v in per_defect.values())
    caught = sum(v["of"] - v["missed"] for v in per_defect.values())
    text = f"good {n_good - false_alarms}/{n_good} OK"
    if per_defect:
        text += f", defects {caught}/{n_def} NG"
        missed = [f"{k} {v['missed']}/{v['of']}" for k, v in per_defect.items() if v["missed"]]
        if missed:
            text += " (missed: " + ", ".join(missed) + ")"
    return text


def report(model_path: str, good: str, defects: str | list[str] | None = None, max_images: int | None = None,
           plot: str | None = None, json_path: str | None = None, class_name: str | None = None) -> dict:
    """Score good (and defect) images with the model as deployed, at its calibrated threshold.

    defects: one folder or several (each folder's name is its defect type: misses are counted per type)."""
    model = Model(model_path, warmup=0, class_name=class_name)
    sc = model.sidecar
    g = _scores(model, good, max_images)
    folders = [defects] if isinstance(defects, str) else list(defects or [])
    per_type = {Path(f).name: _scores(model, f, max_images) for f in folders}
    d = np.concatenate(list(per_type.values())) if per_type else None
    thr = model.threshold
    rep = {
        "model": str(model_path), "provider": model.provider, "n_good": int(len(g)),
        "threshold": thr, "threshold_method": sc.thresholds.method,
        "expected_fpr": sc.thresholds.expected_fpr, "observed_fpr": float((g >= thr).mean()) if len(g) else None,
        "good_score": {"mean": float(g.mean()), "std": float(g.std()), "max": float(g.max())} if len(g) else None,
        "gaussian": dataclasses.asdict(sc.gaussian), "normalization": dataclasses.asdict(sc.normalization),
        "calibration": sc.provenance.get("calibration"),
    }
    per_defect = {k: {"missed": int((v < thr).sum()), "of": int(len(v))} for k, v in per_type.items()}
    rep["false_alarms"] = int((g >= thr).sum())
    rep["misses_per_defect"] = per_defect
    rep["verdict"] = verdict(int(len(g)), rep["false_alarms"], per_defect)
    calib = sc.provenance.get("calibration")
    rep["drift"] = drift.check(calib.get("good_scores") if isinstance(calib, dict) else None, g, thr)
    drift.warn(rep["drift"], good)
    if d is not None and len(d):
        rep.update({"n_defects": int(len(d)), "observed_recall": float((d >= thr).mean()),
                    "image_auroc": auroc(np.r_[np.zeros(len(g)), np.ones(len(d))], np.r_[g, d]) if len(g) else None})
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        bins = np.linspace(min(g.min(), d.min() if d is not None and len(d) else g.min()),
                           max(g.max(), d.max() if d is not None and len(d) else g.max()), 40)
        ax.hist(g, bins=bins, alpha=0.6, label=f"good ({len(g)})", color="tab:green")
        if d is not None and len(d):
            ax.hist(d, bins=bins, alpha=0.6, label=f"defect ({len(d)})", color="tab:red")
        ax.axvline(thr, color="k", ls="--", label=f"threshold {thr:.3g}")
        ax.set_xlabel("image score")
        ax.set_ylabel("images")
        ax.legend()
        fig.tight_layout()
        tmp = Path(plot).with_name(Path(plot).stem + ".tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(plot)
        rep["plot"] = str(plot)
    if json_path:
        atomic_write_text(json_path, json.dumps(rep, indent=2) + "\n")
    return rep
