"""The layout switch of the memory bank's Gaussian score: textures off, products with a layout on, decided the
same way by training and by a torch-free field refit."""
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration.fitting import CalibrationError
from calibration.layout import LAYOUT_MIN, gaussian_switch, layout_cells, layout_fraction, rolled_frames
from runtime.artifact import read_sidecar, sidecar_path
from tests.torch_free import run_torch_free

IMAGE_SIZE = 64


def _texture(tmp: Path, n: int = 44, seed: int = 0) -> Path:
    """Good images of a stationary texture: crops of one large blurred-noise sheet at random places."""
    rng = np.random.default_rng(seed)
    sheet = cv2.GaussianBlur(rng.uniform(0, 255, (600, 600, 3)).astype(np.float32), (0, 0), 2)
    sheet = cv2.normalize(sheet, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    out = tmp / "texture" / "train" / "good"
    out.mkdir(parents=True)
    for i in range(n):
        y, x = rng.integers(0, 600 - 96, 2)
        cv2.imwrite(str(out / f"{i:03d}.png"), sheet[y:y + 96, x:x + 96])
    return out.parents[1]


def test_fraction_is_zero_for_a_stationary_texture_and_high_for_a_layout():
    """On arrays (no backbone): content at fixed places is layout, content at random places is not, and a position
    signal that stays put when the content moves (the backbone's) is taken away."""
    rng = np.random.default_rng(0)
    n, c, h, w = 40, 6, 20, 20
    pattern = rng.normal(size=(c, h, w)) * 2
    layout = pattern + rng.normal(size=(n, c, h, w))
    texture = rng.normal(size=(n, c, h, w))
    bias = np.linspace(-3, 3, h)[None, None, :, None] * np.ones((n, c, h, w))  # position signal of "the network"
    shifted = np.stack([np.roll(pattern, tuple(rng.integers(0, h, 2)), axis=(1, 2)) for _ in range(n)]) + \
        rng.normal(size=(n, c, h, w))
    f_layout = layout_fraction(layout_cells(layout + bias), layout_cells(shifted + bias))
    f_texture = layout_fraction(layout_cells(texture + bias), layout_cells(rng.normal(size=(n, c, h, w)) + bias))
    assert f_texture < 0.02 < LAYOUT_MIN < 0.5 < f_layout, (f_texture, f_layout)
    assert layout_cells(layout).shape == (n, c, 8, 8)  # 20 cells, a margin of 2 each side, then 8 x 8
    with pytest.raises(CalibrationError, match="at least 2"):
        layout_fraction(layout_cells(layout[:1]), layout_cells(layout[:1]))


def test_rolled_frames_move_the_content_deterministically():
    frames = np.random.default_rng(1).integers(0, 255, (40, 16, 24, 3), dtype=np.uint8)
    a, b = rolled_frames(frames), rolled_frames(frames)
    assert a.shape == (32, 16, 24, 3) and np.array_equal(a, b)
    assert sorted(a[0].ravel().tolist()) == sorted(frames[0].ravel().tolist()) and not np.array_equal(a, frames[:32])
    assert gaussian_switch({"gaussian": {"optional": True}}) == "always"
    with pytest.raises(CalibrationError, match="upgrade edgead"):
        gaussian_switch({"gaussian": {"switch": "moon"}})


@pytest.fixture(scope="module")
def auto_onnx(tmp_path_factory):
    """patchcore_lite0 with the default (auto) Gaussian, trained on trays and exported."""
    from export.onnx_export import export_onnx
    from runtime.synthetic import write_dataset
    from train.loop import TrainConfig, train

    data = write_dataset(tmp_path_factory.mktemp("laydata") / "tray", size=96, n_train=48, n_test_good=4,
                         n_per_defect=2, seed=3, defects=("scratch",), product="tray")
    cfg = TrainConfig(data=str(data), out=str(tmp_path_factory.mktemp("layrun")), model="patchcore_lite0",
                      image_size=IMAGE_SIZE, model_kwargs={"memory_size": 256, "coreset_ratio": 0.1})
    return export_onnx(train(cfg), tmp_path_factory.mktemp("layexp") / "model.onnx", batch="dynamic")


def test_training_measures_the_layout_and_keeps_the_gaussian_for_a_product(auto_onnx):
    sc = read_sidecar(auto_onnx)
    assert sc.family_params["gaussian"]["switch"] == "layout"
    assert sc.gaussian.layout is not None and sc.gaussian.layout >= LAYOUT_MIN, sc.gaussian
    assert sc.gaussian.estimator != "off" and sc.score.puad_weight > 0


def test_a_texture_onboarded_torch_free_switches_the_gaussian_off_and_a_product_back_on(auto_onnx, tmp_path):
    from runtime.synthetic import write_dataset

    model = tmp_path / "model.onnx"
    shutil.copy2(auto_onnx, model)
    shutil.copy2(sidecar_path(auto_onnx), sidecar_path(model))
    texture = _texture(tmp_path) / "train" / "good"
    board = write_dataset(tmp_path / "board", size=96, n_train=44, n_test_good=1, n_per_defect=1, seed=5,
                          defects=("scratch",), product="board") / "train" / "good"
    for good, want_on in ((texture, False), (board, True)):
        r = run_torch_free(f"from calibration.cli import main\nraise SystemExit(main(['fit', '--model', {str(model)!r}, "
                           f"'--good', {str(good)!r}]))")
        assert r.returncode == 0, r.stderr[-2000:]
        sc = read_sidecar(model)
        assert sc.gaussian.layout is not None and (sc.gaussian.layout >= LAYOUT_MIN) == want_on, (good, sc.gaussian)
        if want_on:
            assert sc.gaussian.estimator == "ledoit_wolf" and sc.score.puad_weight > 0 and not sc.gaussian.off_reason
        else:
            assert sc.gaussian.estimator == "off" and sc.score.puad_weight == 0
            assert sc.gaussian.off_reason.startswith("no layout")
