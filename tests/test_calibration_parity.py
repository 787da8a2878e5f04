"""Calibration scores with exactly the deployed arithmetic (the bug of issue 18 cannot come back).

For every exported variant -- fp32, fp16, INT8 (export's own refit), smoothing on/off, smoothing
chosen by ``--map-blur auto`` -- after ``calibration fit`` on good images the deployed model's
``image_score`` on those images equals the calibration's own scores (1e-4 relative), and the
share of them at or above the threshold is what the calibration reports. Training-time and field
calibration run the same ``fit_head`` and agree on the same images.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from runtime.artifact import sidecar_path
from runtime.dataset import list_images, read_image


def _variant_checkpoint(trained: Path, out: Path, blur) -> Path:
    """The conftest checkpoint with another smoothing, re-calibrated at training time (no retraining)."""
    import torch

    from train.loop import apply_map_blur, calibrate_model, load_checkpoint, save_checkpoint
    from train.data import load_frames

    model, blob = load_checkpoint(trained)
    root = Path(blob["train"]["data"])
    frames = load_frames(list_images(root / "train" / "good"), (model.cfg.height, model.cfg.width))
    fit, val = frames[: len(frames) * 3 // 4], frames[len(frames) * 3 // 4:]
    with torch.no_grad():
        smoothing = apply_map_blur(model, blur, val, "cpu")
    parts = calibrate_model(model, fit, val, "cpu")
    extra = {k: v for k, v in blob.items() if k not in ("format", "family", "config", "state_dict")}
    extra.update(parts, map_smoothing=smoothing)
    save_checkpoint(out, model, extra)
    return out


def _check_deployed_equals_calibration(model_path: Path, good_dir: Path, result) -> None:
    from runtime.model import Model

    model = Model(model_path)
    frames = [read_image(p) for p in list_images(good_dir)]
    pred = model.predict(frames)
    np.testing.assert_allclose(pred.image_score, result.good_scores, rtol=1e-4, atol=1e-5)
    fpr = float((pred.image_score >= model.threshold).mean())
    assert fpr == pytest.approx(result.thresholds.fit_fpr)
    assert model.threshold == pytest.approx(result.thresholds.image)


@pytest.mark.parametrize("variant", ["fp32", "fp32_no_smoothing", "fp32_auto_smoothing", "fp16", "int8"])
def test_deployed_scores_are_calibration_scores(variant, trained, synthetic_root, tmp_path):
    from calibration.field import calibrate
    from export.onnx_export import export_onnx

    good = synthetic_root / "train" / "good"
    ckpt = trained
    if variant == "fp32_no_smoothing":
        ckpt = _variant_checkpoint(trained, tmp_path / "c.pt", 0.0)
    elif variant == "fp32_auto_smoothing":
        ckpt = _variant_checkpoint(trained, tmp_path / "c.pt", "auto")
    out = tmp_path / "model.onnx"
    if variant == "int8":
        from export.quantize import quantize_qdq

        fp32 = export_onnx(ckpt, tmp_path / "model.fp32.onnx")
        quantize_qdq(fp32, out, good, max_images=16)
        # export --int8 refits on the quantized graph (the CLI's path): its scores must be deployed scores too
        res = calibrate(out, str(good), backup=False)
        _check_deployed_equals_calibration(out, good, res)
    else:
        export_onnx(ckpt, out, fp16=variant == "fp16")
    res = calibrate(out, str(good))
    assert out.with_name(out.name + ".bak").is_file() and sidecar_path(out).with_name("model.onnx.json.bak").is_file()
    _check_deployed_equals_calibration(out, good, res)


def test_with_defects_threshold_is_on_deployed_scores(model_copy, synthetic_root):
    from calibration.field import calibrate
    from runtime.model import Model

    res = calibrate(model_copy, str(synthetic_root / "train" / "good"), defects=str(synthetic_root / "test" / "spot"))
    assert res.thresholds.method == "f1_max"
    pred = Model(model_copy).predict([read_image(p) for p in list_images(synthetic_root / "test" / "spot")])
    np.testing.assert_allclose(pred.image_score, res.defect_scores, rtol=1e-4, atol=1e-5)


def test_training_and_field_fit_agree_on_the_same_images(trained, onnx_model, synthetic_root):
    """The same fit_head, scored by the torch head (training) or by the exported subgraph (field)."""
    from calibration.graph_part import GraphPart
    from calibration.headfit import fit_head
    from runtime.model import Model
    from train.loop import load_checkpoint, torch_scorer

    torch_model, _ = load_checkpoint(trained)
    model = Model(onnx_model)
    out = model.infer(model.prepare([read_image(p) for p in list_images(synthetic_root / "train" / "good")]))
    names = list(model.sidecar.head["map_names"])
    a = fit_head(out["raw_maps"], out["features"], torch_scorer(torch_model, "cpu"), names)
    b = fit_head(out["raw_maps"], out["features"], GraphPart(onnx_model, True), names)
    for k in a.constants:
        np.testing.assert_allclose(a.constants[k], b.constants[k], rtol=1e-4, atol=1e-5, err_msg=k)
    assert a.thresholds.image == pytest.approx(b.thresholds.image, rel=1e-4, abs=1e-5)
    np.testing.assert_allclose(a.good_scores, b.good_scores, rtol=1e-4, atol=1e-5)


def test_training_time_threshold_is_the_exported_models(trained, onnx_model, synthetic_root):
    """The checkpoint's threshold and constants are what the exported graph uses, unchanged."""
    from runtime.model import Model
    from train.loop import load_checkpoint, run_outputs

    torch_model, blob = load_checkpoint(trained)
    model = Model(onnx_model)
    assert model.threshold == blob["thresholds"]["image"]
    frames = model.prepare([read_image(p) for p in list_images(synthetic_root / "test" / "good")])
    ref = run_outputs(torch_model, frames, "cpu", keys=("image_score",))["image_score"]
    np.testing.assert_allclose(model.infer(frames)["image_score"], ref, rtol=1e-4, atol=1e-4)


def test_aspect_check_follows_training_images(model_copy, synthetic_root, tmp_path):
    """A folder the model trained on always calibrates; another aspect is refused unless --any-aspect."""
    import cv2

    from calibration.field import calibrate
    from calibration.fitting import CalibrationError

    wide = tmp_path / "wide"
    wide.mkdir()
    for p in list_images(synthetic_root / "train" / "good"):
        img = read_image(p)
        cv2.imwrite(str(wide / p.name), cv2.resize(img, (img.shape[1] * 2, img.shape[0])))
    with pytest.raises(CalibrationError, match="aspect"):
        calibrate(model_copy, str(wide), dry_run=True)
    calibrate(model_copy, str(wide), dry_run=True, any_aspect=True)
    calibrate(model_copy, str(synthetic_root / "train" / "good"), dry_run=True)


def test_per_class_threshold(model_copy, synthetic_root):
    from calibration.field import calibrate
    from runtime.artifact import ArtifactError, read_sidecar
    from runtime.model import Model

    before = read_sidecar(model_copy)
    calibrate(model_copy, str(synthetic_root / "train" / "good"), class_name="parts", backup=False)
    after = read_sidecar(model_copy)
    assert after.thresholds.image == before.thresholds.image and "parts" in after.thresholds.per_class
    assert Model(model_copy, class_name="parts").threshold == after.thresholds.per_class["parts"]
    with pytest.raises(ArtifactError, match="no threshold for class"):
        Model(model_copy, class_name="other")


def test_too_few_images_switch_an_optional_gaussian_off_and_refuse_a_required_one(trained, onnx_model, synthetic_root,
                                                                                  caplog):
    """A graph that declares its Gaussian optional (a memory onboards from a handful of images) gets map-only
    constants and a warning that says how many images turn the Gaussian on; others are refused, as before."""
    from calibration.fitting import CalibrationError
    from calibration.graph_part import GraphPart
    from calibration.headfit import fit_head, gaussian_optional
    from runtime.model import Model

    model = Model(onnx_model)
    out = model.infer(model.prepare([read_image(p) for p in list_images(synthetic_root / "train" / "good")][:8]))
    names = list(model.sidecar.head["map_names"])
    part = GraphPart(onnx_model, True)
    with pytest.raises(CalibrationError, match="too few"):
        fit_head(out["raw_maps"], out["features"], part, names)
    with caplog.at_level("WARNING"):
        fit = fit_head(out["raw_maps"], out["features"], part, names, gaussian_optional=True)
    assert "at least" in caplog.text and fit.gaussian.estimator == "off"
    assert fit.constants["score_weight"][1] == 0.0 and fit.score.puad_weight == 0.0
    # the image score is then the normalized map score alone
    scores = part(fit.constants, out["raw_maps"], out["features"])
    z = (scores["map_score"] - fit.score.map_mean) / fit.score.map_std
    np.testing.assert_allclose(scores["image_score"], z, rtol=1e-4, atol=1e-4)
    assert gaussian_optional({"gaussian": {"optional": True}}) and not gaussian_optional({}) and not gaussian_optional(None)
