"""Field calibration: refit every decision constant of a deployed artifact from good frames.

Runs the deployed model (through the runtime, no torch) over good images, then:
map quantiles (q_a/q_b) from the raw maps; the Gaussian from pooled features (2-fold,
so each image gets an out-of-sample Mahalanobis score, then a final fit on all);
score z-normalization; the OK/NG threshold at a target FPR, or at F1-max when
labelled defects are given. The artifact is rewritten atomically with a backup;
any failure leaves it byte-identical.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from runtime.artifact import (ArtifactError, GaussianInfo, Normalization, ScoreSpec, Thresholds, read_sidecar,
                              sidecar_path, write_sidecar)
from runtime.model import Model

from . import fitting
from .fitting import CalibrationError

log = logging.getLogger(__name__)

REQUIRED_OUTPUTS = ("features", "map_st_raw", "map_ae_raw", "picturable_score")


def iter_images(source: str, max_images: int | None = None) -> Iterable[np.ndarray]:
    """Frames from a folder of images, a video file, or ``camera:N`` (through the runtime's sources)."""
    from itertools import islice

    from runtime.sources import CaptureSource, FolderSource, SourceError

    p = Path(source)
    try:
        if source.startswith("camera:"):
            src = CaptureSource(int(source.split(":", 1)[1]), "camera")
        elif p.is_dir():
            src = FolderSource(p)
        elif p.is_file():
            src = CaptureSource(str(p), "video")
        else:
            raise CalibrationError(f"{source}: not found; pass a folder of good images, a video file or camera:N")
        try:
            yield from islice(src.frames(), max_images)
        finally:
            src.close()
    except SourceError as e:
        raise CalibrationError(f"{e}; pass a folder of good images, a video file or camera:N") from e


def batched(items: Iterable, n: int) -> Iterator[list]:
    """Lists of up to n consecutive items (itertools.batched needs Python 3.12; JetPack has 3.10)."""
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def check_frame(frame: np.ndarray, expected: list[int] | None, where: str) -> None:
    """Refuse frames whose colour or aspect differs from the training images (wrong camera or setting).

    expected: [height, width, channels] of the training images (channels 1 = grayscale).
    """
    if not expected:
        return
    eh, ew, ec = expected
    gray = frame.ndim == 2 or frame.shape[2] == 1 or (
        np.array_equal(frame[..., 0], frame[..., 1]) and np.array_equal(frame[..., 1], frame[..., 2]))
    if ec == 3 and gray:
        raise CalibrationError(f"{where}: grayscale image, but the model was trained on colour images; "
                               "use the colour camera setting")
    aspect, easpect = frame.shape[1] / frame.shape[0], ew / eh
    if abs(aspect / easpect - 1) > 0.1:
        raise CalibrationError(f"{where}: image is {frame.shape[1]}x{frame.shape[0]} (aspect {aspect:.2f}), training images "
                               f"were {ew}x{eh} (aspect {easpect:.2f}); crop the camera image like the training images")


@dataclass
class Collected:
    features: np.ndarray
    map_st: np.ndarray
    map_ae: np.ndarray


def collect(model: Model, frames: Iterable[np.ndarray], batch: int = 8, desc: str = "good images") -> Collected:
    missing = [k for k in REQUIRED_OUTPUTS if k not in model.backend.output_names]
    if missing:
        raise CalibrationError(f"{model.path}: model lacks outputs {missing} needed for calibration; "
                               "re-export it with `python -m export onnx`")
    expected = model.sidecar.provenance.get("source_shape")
    feats, st, ae = [], [], []

    def checked():
        for i, f in enumerate(frames):
            check_frame(f, expected, f"image {i}")
            yield f

    for chunk in batched(tqdm(checked(), desc=desc, leave=False), batch):
        out = model.infer(model.prepare(chunk))
        feats.append(out["features"])
        st.append(out["map_st_raw"][:, 0])
        ae.append(out["map_ae_raw"][:, 0])
    if not feats:
        raise CalibrationError("no images were read")
    return Collected(np.concatenate(feats), np.concatenate(st), np.concatenate(ae))


def picturable_from_maps(map_st: np.ndarray, map_ae: np.ndarray, norm: Normalization) -> np.ndarray:
    """Same formula as the graph: max over the combined normalized map."""
    a, b, c, d = norm.affine()
    m = (map_st * a + b) + (map_ae * c + d)
    return m.reshape(len(m), -1).max(1)


@dataclass
class CalibrationResult:
    constants: dict[str, np.ndarray]
    normalization: Normalization
    gaussian: GaussianInfo
    score: ScoreSpec
    thresholds: Thresholds
    n_images: int
    good_scores: np.ndarray
    defect_scores: np.ndarray | None


def compute(model: Model, good: Collected, defects: Collected | None = None, target_fpr: float = 0.01,
            puad_weight: float | None = None, estimator: str = "ledoit_wolf",
            puad_gate: float | None | object = fitting.KEEP_GATE) -> CalibrationResult:
    n = len(good.features)
    need = fitting.required_images(good.features.shape[1])
    if n < 2 * need:  # 2-fold: each half must carry a Gaussian
        raise CalibrationError(f"{n} good images are too few for {good.features.shape[1]}-dimensional features; "
                               f"give at least {2 * need}")
    norm = fitting.map_quantiles(good.map_st, good.map_ae)
    pic = picturable_from_maps(good.map_st, good.map_ae, norm)
    rng = np.random.default_rng(0)
    idx = rng.permutation(n)
    halves = (idx[: n // 2], idx[n // 2:])
    unpic = np.empty(n)
    for a, b in (halves, halves[::-1]):
        g = fitting.fit_gaussian(good.features[a], estimator)
        unpic[b] = fitting.mahalanobis(good.features[b], g)
    g_all = fitting.fit_gaussian(good.features, estimator)
    w = model.sidecar.score.puad_weight if puad_weight is None else puad_weight
    gate = model.sidecar.score.puad_gate if puad_gate is fitting.KEEP_GATE else puad_gate
    spec = fitting.score_normalization(pic, unpic, w, gate)
    good_scores = fitting.combine_scores(pic, unpic, spec)
    defect_scores = None
    if defects is not None and len(defects.features):
        d_pic = picturable_from_maps(defects.map_st, defects.map_ae, norm)
        d_unpic = fitting.mahalanobis(defects.features, g_all)
        defect_scores = fitting.combine_scores(d_pic, d_unpic, spec)
        thr = fitting.threshold_f1(good_scores, defect_scores)
    else:
        thr = fitting.threshold_at_fpr(good_scores, target_fpr)
    center, weight = fitting.score_constants(spec)
    st_scale, st_shift, ae_scale, ae_shift = norm.affine()
    constants = {
        "st_scale": np.float32(st_scale), "st_shift": np.float32(st_shift),
        "ae_scale": np.float32(ae_scale), "ae_shift": np.float32(ae_shift),
        "gaussian_mean": g_all.mean.astype(np.float32), "gaussian_whitener": g_all.whitener.astype(np.float32),
        "score_center": center.astype(np.float32), "score_weight": weight.astype(np.float32),
    }
    return CalibrationResult(constants, norm, g_all.info, spec, thr, n, good_scores, defect_scores)


def write_onnx_constants(model_path: Path, constants: dict[str, np.ndarray]) -> bytes:
    """The ONNX bytes with the named initializers replaced (shape and dtype kept)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(model_path))
    inits = {i.name: i for i in m.graph.initializer}
    for name, value in constants.items():
        if name not in inits:
            raise CalibrationError(f"{model_path}: no initializer {name!r}; re-export the model with `python -m export onnx`")
        old = numpy_helper.to_array(inits[name])
        new = np.asarray(value, dtype=old.dtype).reshape(old.shape)
        inits[name].CopyFrom(numpy_helper.from_array(new, name))
    return m.SerializeToString()


def apply(model_path: str | Path, result: CalibrationResult, source: str, backup: bool = True) -> Path:
    """Rewrite the artifact's constants and sidecar atomically; keep ``.bak`` copies of both."""
    from runtime.artifact import atomic_write_bytes

    model_path = Path(model_path)
    sc = read_sidecar(model_path)
    suffix = model_path.suffix.lower()
    if suffix == ".onnx":
        data = write_onnx_constants(model_path, result.constants)
    elif suffix in (".engine", ".plan"):
        from runtime.backends.tensorrt_backend import refit_engine

        data = refit_engine(model_path, result.constants)
    else:
        raise ArtifactError(f"{model_path}: calibration rewrites .onnx and TensorRT engines; re-export {suffix} models")
    if backup:
        shutil.copy2(model_path, model_path.with_name(model_path.name + ".bak"))
        shutil.copy2(sidecar_path(model_path), sidecar_path(model_path).with_name(sidecar_path(model_path).name + ".bak"))
    sc.normalization = result.normalization
    sc.gaussian = result.gaussian
    sc.score = result.score
    sc.thresholds = result.thresholds
    sc.provenance["calibration"] = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                    "source": source, "n_images": result.n_images}
    # hardening #26: good-score statistics for `calibration report`'s drift check (calibration/drift.py)
    from .drift import reference_stats
    sc.provenance["calibration"]["good_scores"] = reference_stats(result.good_scores)
    # write the model first, then the sidecar stamped with the new hash; a crash between the two
    # is detected by the hash check and repaired from the .bak files
    atomic_write_bytes(model_path, data)
    write_sidecar(model_path, sc)
    return model_path


def calibrate(model_path: str | Path, good: str, defects: str | None = None, target_fpr: float = 0.01,
              max_images: int | None = None, puad_weight: float | None = None, dry_run: bool = False,
              puad_gate: float | None | object = fitting.KEEP_GATE, backup: bool = True) -> CalibrationResult:
    """Refit every constant of a deployed model on good images and rewrite it in place.

    ``backup=False`` for a model the caller has just written itself (export's INT8 refit):
    a ``.bak`` of it would only be litter."""
    model = Model(model_path, warmup=0)
    g = collect(model, iter_images(good, max_images))
    d = collect(model, iter_images(defects, max_images), desc="defect images") if defects else None
    result = compute(model, g, d, target_fpr, puad_weight, puad_gate=puad_gate)
    model.close()
    if not dry_run:
        apply(model_path, result, source=str(good), backup=backup)
    log.info("calibrated %s on %d images: threshold %.4f (%s), expected FPR %s, condition number %.3g",
             model_path, result.n_images, result.thresholds.image, result.thresholds.method,
             result.thresholds.expected_fpr, result.gaussian.condition_number)
    return result


def summary(result: CalibrationResult) -> dict:
    return {"n_images": result.n_images, "normalization": dataclasses.asdict(result.normalization),
            "gaussian": dataclasses.asdict(result.gaussian), "score": dataclasses.asdict(result.score),
            "thresholds": dataclasses.asdict(result.thresholds)}
