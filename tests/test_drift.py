"""Drift: `calibration report` flags when today's good images score unlike the calibration set."""
import json
import logging
import os

import numpy as np
import pytest

from calibration import drift
from tests.test_calibration import _darker_copies  # the same light change the calibration tests use


def test_check_numbers():
    rng = np.random.default_rng(0)
    ref = drift.reference_stats(rng.normal(1.0, 0.2, 400))
    assert ref["n"] == 400 and ref["mean"] == pytest.approx(1.0, abs=0.03) and ref["q99"] > ref["q95"] > ref["q50"]
    same = drift.check(ref, rng.normal(1.0, 0.2, 50), threshold=1.5)
    assert not same["flagged"] and abs(same["mean_shift_sigma"]) < 0.5 and same["observed_fpr"] < 0.05
    shifted = drift.check(ref, rng.normal(1.5, 0.2, 50), threshold=1.5)
    assert shifted["flagged"] and shifted["mean_shift_sigma"] > 2 and "higher than at calibration" in shifted["reasons"][0]
    assert shifted["above_q99"] > 0.3
    wide = drift.check(ref, rng.normal(1.0, 0.6, 200))
    assert wide["flagged"] and "wider" in wide["reasons"][-1]
    lower = drift.check(ref, rng.normal(0.6, 0.2, 50))
    assert lower["flagged"] and "lower" in lower["reasons"][0]


@pytest.mark.parametrize("ref", [None, {}, {"n": 3, "mean": 1.0, "std": 0.1}, {"n": 50, "mean": float("nan"), "std": 1},
                                 {"n": 50, "mean": 1.0, "std": 0.0}, {"n": "50", "mean": 1.0, "std": 0.1}, [1, 2]])
def test_missing_or_broken_reference_gives_status_not_crash(ref):
    out = drift.check(ref, np.ones(20))
    assert out["flagged"] is False and "no reference" in out["status"]


def test_too_few_images():
    out = drift.check(drift.reference_stats(np.linspace(0, 1, 100)), np.ones(3))
    assert not out["flagged"] and "too few" in out["status"]


def test_fit_stores_reference_keeps_modes_and_report_flags_changed_light(model_copy, synthetic_root, tmp_path, caplog):
    from calibration.cli import main as calibration_main
    from calibration.field import calibrate
    from calibration.report import report
    from runtime.artifact import read_sidecar, sidecar_path

    old = os.umask(0o022)
    try:
        os.chmod(model_copy, 0o640)  # a service account's group may read the model
        os.chmod(sidecar_path(model_copy), 0o640)
        res = calibrate(model_copy, str(synthetic_root / "train" / "good"))
    finally:
        os.umask(old)
    for p in (model_copy, sidecar_path(model_copy), model_copy.with_name("model.onnx.bak"),
              sidecar_path(model_copy).with_name("model.onnx.json.bak")):
        assert p.stat().st_mode & 0o777 == 0o640, p  # not mkstemp's 0600
    ref = read_sidecar(model_copy).provenance["calibration"]["good_scores"]
    assert ref["n"] == res.n_images and ref["mean"] == pytest.approx(float(np.mean(res.good_scores)))

    same = report(str(model_copy), str(synthetic_root / "test" / "good"))["drift"]  # held-out parts, same light
    assert not same["flagged"] and abs(same["mean_shift_sigma"]) < 1, same
    dark = _darker_copies(synthetic_root / "test" / "good", tmp_path / "dark", 0.5)
    caplog.set_level(logging.INFO)
    rep = report(str(model_copy), str(dark), json_path=str(tmp_path / "report.json"))
    d = rep["drift"]
    assert d["flagged"] and d["mean_shift_sigma"] > 1, d
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.getMessage().startswith("drift")]
    assert len(msgs) == 1 and "sigma" in msgs[0] and "recalibrate" in msgs[0]
    assert json.loads((tmp_path / "report.json").read_text())["drift"]["flagged"] is True
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o666 & ~old
    # the CLI prints the same report (exit 0: drift is a warning, not an error)
    assert calibration_main(["report", "--model", str(model_copy), "--good", str(dark)]) == 0
