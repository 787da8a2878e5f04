"""TensorRT engine build/run/refit. TensorRT cannot be installed on the dev/CI machines of this
project, so these tests skip there with that reason; they run where `tensorrt` and a GPU exist."""
import numpy as np
import pytest

trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed on this machine (needs an NVIDIA GPU)")
pytest.importorskip("pycuda", reason="pycuda is not installed on this machine")


def test_engine_matches_onnx(tmp_path, onnx_model, synthetic_root):
    from export.tensorrt_build import build_engine
    from runtime.dataset import open_dataset, read_image
    from runtime.model import Model

    eng = build_engine(onnx_model, tmp_path / "m.engine")
    frames = [read_image(s.path) for s in open_dataset(synthetic_root).test[:8]]
    a = Model(onnx_model).predict(frames)
    b = Model(eng).predict(frames)
    assert np.abs(a.anomaly_map - b.anomaly_map).max() <= 1e-3
    assert np.abs(a.image_score - b.image_score).max() <= 1e-2 * max(1, np.abs(a.image_score).max())


def test_engine_refit(tmp_path, onnx_model, synthetic_root):
    from calibration.field import calibrate
    from export.tensorrt_build import build_engine

    eng = build_engine(onnx_model, tmp_path / "m.engine")
    res = calibrate(eng, str(synthetic_root / "train" / "good"))
    assert res.n_images > 0
