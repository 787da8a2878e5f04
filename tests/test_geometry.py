"""The grid offset: where a feature grid really sees, and the deploy head drawing the map there."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.geometry import measure_grid_offset
from train.models.head import DeployHead


def _as_input(frames: torch.Tensor) -> torch.Tensor:
    return frames.permute(0, 3, 1, 2).float()


def _cells_seen_from(dy: int, dx: int, stride: int):
    """A grid whose cell i averages the input pixels [s*i - dy, s*i - dy + s): it reads from dy px above (and dx
    left of) its own cell, so a defect shows up dy px further down (dx further right) than it is."""
    def features(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        moved = F.pad(x, (dx, 0, dy, 0), mode="replicate")[..., :h, :w]
        return F.avg_pool2d(moved, stride)
    return features


@pytest.mark.parametrize("size,stride", [((256, 256), 16), ((192, 320), 8)])
def test_a_grid_that_sees_its_own_cell_has_no_offset(size, stride):
    dy, dx = measure_grid_offset(_cells_seen_from(0, 0, stride), _as_input, size)
    assert abs(dy) < 1.0 and abs(dx) < 1.0


def test_the_measure_finds_a_known_offset_per_axis():
    dy, dx = measure_grid_offset(_cells_seen_from(6, 3, 16), _as_input, (256, 256))
    assert dy == pytest.approx(6, abs=1.0) and dx == pytest.approx(3, abs=1.0)


def test_the_lite_trunk_reads_each_cell_from_above_left():
    """The measured fact behind the offset: EfficientNet-Lite2 stages 0-3 averaged to a stride-16 grid (UniAD's
    tokens) put a 6 px defect's response about 10 px below and right of it at 256 px."""
    from train.models import create_model

    model = create_model("uniad", image_size=256, pretrained=True)
    dy, dx = measure_grid_offset(model.grid_features, model.preprocess, (256, 256))
    assert 6.0 < dy < 14.0 and 6.0 < dx < 14.0


def test_the_head_moves_the_map_back_by_the_offset():
    torch.manual_seed(0)
    raw = torch.rand(2, 1, 8, 12)
    plain = DeployHead(("m",), (8, 12))(raw, None, (128, 192))["anomaly_map"]
    head = DeployHead(("m",), (8, 12), map_offset_px=(5.4, -3.0))
    moved = head(raw, None, (128, 192))["anomaly_map"]
    assert moved.shape == plain.shape
    # the map at p is the plain map at p + (5, -3): a response drawn 5 px too low and 3 px too far left comes back
    assert torch.allclose(moved[:, :, 10:110, 10:180], plain[:, :, 15:115, 7:177], atol=1e-6)
    # scores are taken on the grid: the offset cannot move them
    assert torch.equal(head(raw, None, (128, 192))["image_score"], DeployHead(("m",), (8, 12))(raw, None, (128, 192))["image_score"])
    with pytest.raises(ValueError, match="whole multiple"):
        head(raw, None, (100, 192))


def test_an_offset_larger_than_a_cell_and_the_border():
    raw = torch.arange(16.0).view(1, 1, 4, 4)
    plain = DeployHead(("m",), (4, 4))(raw, None, (32, 32))["anomaly_map"]
    moved = DeployHead(("m",), (4, 4), map_offset_px=(-11, 19))(raw, None, (32, 32))["anomaly_map"]
    assert torch.allclose(moved[:, :, 11:, :13], plain[:, :, :21, 19:], atol=1e-6)
    # beyond the grid the map continues as the plain upsampling does at its border (edge values)
    assert torch.allclose(moved[:, :, :11, :13], plain[:, :, :1, 19:].expand(-1, -1, 11, -1), atol=1e-6)
    assert torch.allclose(moved[:, :, 11:, 13:], plain[:, :, :21, 31:].expand(-1, -1, -1, 19), atol=1e-6)


def test_training_measures_the_offset_and_the_graph_draws_it(tmp_path):
    """A UniAD trained with the offset left open measures it; one trained with a given offset keeps it, and the
    exported graph (ONNX Runtime) draws its map moved by it, matching torch; old checkpoints have none."""
    logging.getLogger("train").setLevel(logging.WARNING)
    from export.onnx_export import export_onnx
    from runtime.artifact import read_sidecar
    from runtime.model import Model
    from runtime.synthetic import write_dataset
    from train.loop import TrainConfig, load_checkpoint, run_outputs, train
    from train.models.uniad import UniADConfig

    data = write_dataset(tmp_path / "board", size=64, n_train=24, n_test_good=1, n_per_defect=1, seed=0, product="board")
    tiny = dict(feature_stride=8, hidden=16, heads=2, encoder_layers=1, decoder_layers=1, ff=32)

    def fit(name: str, **kw):
        cfg = TrainConfig(data=str(data), out=str(tmp_path / name), model="uniad", image_size=64, steps=2,
                          batch_size=2, pretrained=False, save_every=0, model_kwargs={**tiny, **kw})
        return train(cfg)

    measured, blob = load_checkpoint(fit("open"))
    assert blob["map_geometry"]["how"].startswith("measured") and measured.cfg.map_offset_px is not None
    assert list(measured.cfg.map_offset_px) == blob["map_geometry"]["map_offset_px"]

    ckpt = fit("given", map_offset_px=[7, -3])
    model, blob = load_checkpoint(ckpt)
    assert model.cfg.map_offset_px == (7.0, -3.0) and blob["map_geometry"]["how"] == "given"
    frames = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    deployed = Model(export_onnx(ckpt, tmp_path / "uni.onnx")).predict(list(frames)).anomaly_map
    ref = run_outputs(model, frames, "cpu", keys=("anomaly_map",))["anomaly_map"][:, 0]
    assert np.abs(deployed - ref).max() < 1e-4
    from train.geometry import drawn_at

    with drawn_at(model, (0.0, 0.0)):
        plain = run_outputs(model, frames, "cpu", keys=("anomaly_map",))["anomaly_map"][:, 0]
    assert np.abs(deployed[:, 4:50, 10:60] - plain[:, 11:57, 7:57]).max() < 1e-4
    assert model.cfg.map_offset_px == (7.0, -3.0) and model.head.drawn_offset_px == (7, -3)  # its own offset back
    assert read_sidecar(tmp_path / "uni.onnx").head["map_offset_px"] == [7, -3]

    assert UniADConfig.from_dict({"name": "uniad"}).map_offset_px == (0.0, 0.0)  # written before the field
    assert UniADConfig().map_offset_px is None  # new models: measured when training starts


def test_a_model_without_a_feature_grid_is_drawn_as_it_is():
    import tests.toy_family  # noqa: F401  (registers the toy family)
    from train.geometry import apply_grid_offset
    from train.models import create_model

    model = create_model("toy_mean_patch", image_size=64, map_offset_px=None)
    facts = apply_grid_offset(model)
    assert model.cfg.map_offset_px == (0.0, 0.0) and facts["how"].startswith("no feature grid")
    given = create_model("toy_mean_patch", image_size=64, map_offset_px=[2, 1])
    assert apply_grid_offset(given) == {"map_offset_px": [2.0, 1.0], "how": "given"} and given.head.map_offset_px == (2.0, 1.0)
