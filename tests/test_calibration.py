"""Field calibration from a deployed artifact (runtime + scikit-learn, no torch in the code path)."""
import cv2
import numpy as np
import pytest

from calibration.field import calibrate, collect, iter_images
from calibration.fitting import (CalibrationError, fit_gaussian, parse_gate, required_images, score_constants,
                                 score_normalization, threshold_at_fpr)
from runtime.artifact import read_sidecar, sidecar_path
from runtime.model import Model


def test_recalibration_reproduces_training_statistics(model_copy, trained, synthetic_root):
    import torch

    blob = torch.load(trained, weights_only=True)
    before = read_sidecar(model_copy)
    res = calibrate(model_copy, str(synthetic_root / "train" / "good"))
    n = res.normalization
    assert n.map_names == blob["normalization"]["map_names"] == ["student_teacher", "student_autoencoder"]
    # training used a 10% hold-out for quantiles; the field fit uses all good images: close, not equal
    for k in ("q_low", "q_high"):
        assert len(getattr(n, k)) == 2
        for field_q, train_q in zip(getattr(n, k), blob["normalization"][k]):
            assert field_q == pytest.approx(train_q, rel=0.25), k
    mean_train = blob["state_dict"]["head.gaussian_mean"].numpy()
    rel = np.linalg.norm(res.constants["gaussian_mean"] - mean_train) / np.linalg.norm(mean_train)
    assert rel < 0.05
    after = read_sidecar(model_copy)  # hash re-stamped, stats updated
    assert after.model_sha256 != before.model_sha256
    assert after.provenance["calibration"]["n_images"] == res.n_images
    assert model_copy.with_name("model.onnx.bak").exists() and sidecar_path(model_copy).with_name("model.onnx.json.bak").exists()


def _darker_copies(src, dst, factor):
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.glob("*.png")):
        img = cv2.imread(str(p))
        cv2.imwrite(str(dst / p.name), np.clip(img.astype(np.float32) * factor, 0, 255).astype(np.uint8))
    return dst


def test_recalibrating_on_new_lighting_lowers_false_positives(model_copy, synthetic_root, tmp_path):
    from runtime.synthetic import write_dataset

    # the line's lighting dropped by 25%: fresh good parts under the new light
    fresh = write_dataset(tmp_path / "fresh", size=96, n_train=60, n_test_good=30, n_per_defect=0, seed=11, defects=())
    calib = _darker_copies(fresh / "train" / "good", tmp_path / "calib", 0.75)
    held_out = _darker_copies(fresh / "test" / "good", tmp_path / "held", 0.75)
    m = Model(model_copy, warmup=0)
    frames = list(iter_images(str(held_out)))
    fpr_before = float(m.predict(frames).is_ng.mean())
    calibrate(model_copy, str(calib), target_fpr=0.01)
    fpr_after = float(Model(model_copy, warmup=0).predict(frames).is_ng.mean())
    assert fpr_before > 0.5, fpr_before  # the shift really breaks the old calibration
    assert fpr_after < fpr_before and fpr_after <= 0.2, (fpr_before, fpr_after)


def test_failed_calibration_leaves_artifact_byte_identical(model_copy, synthetic_root, tmp_path):
    model_bytes = model_copy.read_bytes()
    side_bytes = sidecar_path(model_copy).read_bytes()
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted((synthetic_root / "train" / "good").glob("*.png"))[:5]:
        (few / p.name).write_bytes(p.read_bytes())
    with pytest.raises(CalibrationError, match="too few .* give at least"):
        calibrate(model_copy, str(few))
    gray = tmp_path / "gray"
    gray.mkdir()
    for p in sorted((synthetic_root / "train" / "good").glob("*.png")):
        cv2.imwrite(str(gray / p.name), cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2GRAY))
    with pytest.raises(CalibrationError, match="grayscale"):
        calibrate(model_copy, str(gray))
    wide = tmp_path / "wide"
    wide.mkdir()
    img = cv2.imread(str(sorted((synthetic_root / "train" / "good").glob("*.png"))[0]))
    cv2.imwrite(str(wide / "a.png"), cv2.resize(img, (200, 96)))
    with pytest.raises(CalibrationError, match="aspect"):
        calibrate(model_copy, str(wide))
    with pytest.raises(CalibrationError, match="not found"):
        calibrate(model_copy, str(tmp_path / "nowhere"))
    assert model_copy.read_bytes() == model_bytes
    assert sidecar_path(model_copy).read_bytes() == side_bytes
    assert not model_copy.with_name("model.onnx.bak").exists()


def test_degenerate_and_small_feature_sets():
    with pytest.raises(CalibrationError, match="give at least"):
        fit_gaussian(np.random.default_rng(0).normal(size=(5, 64)))
    with pytest.raises(CalibrationError, match="identical features"):
        fit_gaussian(np.ones((100, 8)))
    assert required_images(152) == 19
    t = threshold_at_fpr(np.arange(100.0), 0.05)
    assert t.expected_fpr <= 0.05 and (np.arange(100.0) >= t.image).sum() == 5


def _head_image_score(map_scores, gaussian_scores, spec):
    """The deploy head's image score for given component scores and a score spec, computed by the head itself
    (float64): one raw map of one cell carries the map score, a 1-d feature with a unit Gaussian the Gaussian score."""
    import torch

    from train.models.head import DeployHead

    head = DeployHead(("m",), (1, 1), feature_dim=1, blur_px=0.0).double()
    center, weight = score_constants(spec)
    head.write(map_scale=[1.0], map_shift=[0.0], gaussian_mean=[0.0], gaussian_whitener=[[1.0]],
               score_center=center, score_weight=weight)
    maps = torch.as_tensor(np.asarray(map_scores, np.float64)).view(-1, 1, 1, 1)
    feats = torch.as_tensor(np.asarray(gaussian_scores, np.float64)).view(-1, 1)
    with torch.no_grad():
        out = head(maps, feats, (1, 1))
    np.testing.assert_allclose(out["map_score"].numpy(), map_scores, atol=1e-12)
    np.testing.assert_allclose(out["gaussian_score"].numpy(), gaussian_scores, atol=1e-9)  # sqrt(u^2 + 1e-12), u > 0
    return out["image_score"].numpy()


def test_puad_gate_counts_the_gaussian_score_only_beyond_the_gate():
    rng = np.random.default_rng(0)
    p, u = rng.gamma(4, 1, 200), rng.gamma(9, 1, 200)  # good images: both scores positive
    plain = score_normalization(p, u, 0.5, None)
    zp, zu = (p - p.mean()) / p.std(), (u - u.mean()) / u.std()
    s = _head_image_score(p, u, plain)  # the paper's sum, up to one constant
    np.testing.assert_allclose(s - s[0], (0.5 * zp + 0.5 * zu) - (0.5 * zp[0] + 0.5 * zu[0]), atol=1e-9)
    gated = score_normalization(p, u, 0.5, 2.0)
    g = _head_image_score(p, u, gated)
    below = zu <= 2.0
    assert below.any() and (~below).any()
    np.testing.assert_allclose(g[below], 0.5 * zp[below], atol=1e-9)  # ordinary parts: map score alone
    np.testing.assert_allclose(g[~below], 0.5 * zp[~below] + 0.5 * (zu[~below] - 2.0), atol=1e-9)
    assert parse_gate("none") is None and parse_gate("1.5") == 1.5
    with pytest.raises(Exception, match="standard deviations"):
        parse_gate("two")
    with pytest.raises(CalibrationError, match="gate"):
        score_normalization(p, u, 0.5, float("inf"))


def test_calibration_can_switch_the_gate(model_copy, synthetic_root):
    assert read_sidecar(model_copy).score.puad_gate == 2.0  # training's default
    res = calibrate(model_copy, str(synthetic_root / "train" / "good"), puad_gate=None, dry_run=True)
    assert res.score.puad_gate is None and res.constants["score_center"][1] == 0.0
    kept = calibrate(model_copy, str(synthetic_root / "train" / "good"), dry_run=True)
    assert kept.score.puad_gate == 2.0 and kept.constants["score_center"][1] > 0
    from calibration.cli import main  # the CLI's default keeps the model's gate

    assert main(["fit", "--model", str(model_copy), "--good", str(synthetic_root / "train" / "good"), "--dry-run"]) == 0
    assert main(["fit", "--model", str(model_copy), "--good", str(synthetic_root / "train" / "good"), "--dry-run",
                 "--puad-gate", "none"]) == 0


def test_model_without_feature_output_is_refused(tmp_path, onnx_model):
    import onnx

    from runtime.artifact import write_sidecar

    g = onnx.load(str(onnx_model))
    keep = [o for o in g.graph.output if o.name not in ("features",)]
    del g.graph.output[:]
    g.graph.output.extend(keep)
    p = tmp_path / "nofeat.onnx"
    onnx.save(g, str(p))
    sc = read_sidecar(onnx_model)
    sc.outputs.pop("features")
    write_sidecar(p, sc)
    m = Model(p, warmup=0)
    with pytest.raises(CalibrationError, match="lacks outputs"):
        collect(m, [np.zeros((96, 96, 3), np.uint8)])


def test_report_writes_plot(model_copy, synthetic_root, tmp_path):
    from calibration.report import report

    rep = report(str(model_copy), str(synthetic_root / "test" / "good"), str(synthetic_root / "test" / "spot"),
                 plot=str(tmp_path / "h.png"), json_path=str(tmp_path / "r.json"))
    assert rep["n_good"] == 12 and rep["n_defects"] == 4 and (tmp_path / "h.png").stat().st_size > 1000
    assert 0 <= rep["observed_fpr"] <= 1
