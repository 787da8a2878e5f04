"""UniAD family: shapes, the neighbour mask, each anti-shortcut switch, multi-class training.

Export, calibration and streaming go through tests/test_contract.py (FAMILY_CASES["uniad"]).
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from train.models import create_model
from train.models.uniad import Attention, jitter_tokens, neighbour_mask

TINY = dict(pretrained=False, feature_stride=8, hidden=16, heads=2, encoder_layers=1, decoder_layers=1, ff=32)


def _model(**kw):
    torch.manual_seed(0)
    return create_model("uniad", image_size=64, **{**TINY, **kw})


def test_shapes_and_outputs():
    m = _model().eval()
    frames = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    maps, feats = m.raw(m.preprocess(frames))
    assert maps.shape == (3, 1, 8, 8) and feats is None and bool((maps >= 0).all())
    out = m(frames)
    assert set(out) == {"anomaly_map", "image_score", "map_score", "raw_maps"}
    assert out["anomaly_map"].shape == (3, 1, 64, 64) and out["image_score"].shape == (3,)
    assert m.neighbor_size == 5  # automatic: about half of the 8x8 grid, odd


def test_area_resampling_averages_each_grid_cell():
    m = _model(feature_resample="area", feature_stride=16, out_indices=(1, 2, 3)).eval()
    x = m.preprocess(torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8))
    stages = m.features.body(x)
    assert [tuple(f.shape[-2:]) for f in stages] == [(16, 16), (8, 8), (4, 4)]  # strides 4, 8, 16 at 64 px
    got = m.features.grid_features(x)
    c0, c1 = stages[0].shape[1], stages[1].shape[1]
    torch.testing.assert_close(got[:, :c0], stages[0].reshape(2, c0, 4, 4, 4, 4).mean(dim=(3, 5)))  # 4x4-pixel cells
    torch.testing.assert_close(got[:, c0:c0 + c1], stages[1].reshape(2, c1, 4, 2, 4, 2).mean(dim=(3, 5)))
    torch.testing.assert_close(got[:, c0 + c1:], stages[2])
    # bilinear reads only 2 of every 4 pixels per axis: it differs where the factor is 4 (equal at factor 2)
    bilinear = _model(feature_stride=16, feature_resample="bilinear", out_indices=(1, 2, 3)).eval()
    bilinear = bilinear.features.grid_features(x)
    assert not torch.allclose(got[:, :c0], bilinear[:, :c0])
    torch.testing.assert_close(got[:, c0:], bilinear[:, c0:])
    with pytest.raises(ValueError, match="bilinear, area"):
        _model(feature_resample="nearest")


def test_checkpoints_from_before_area_resampling_keep_bilinear():
    from train.models.uniad import UniADConfig

    new = UniADConfig()
    assert new.feature_resample == "area" and "LEGACY_DEFAULTS" not in new.to_dict()
    old = new.to_dict()
    del old["feature_resample"]  # as written before the field existed
    assert UniADConfig.from_dict(old).feature_resample == "bilinear"
    assert UniADConfig.from_dict(new.to_dict()).feature_resample == "area"


def test_neighbour_mask_matches_its_definition():
    grid, k = (3, 4), 3
    mask = neighbour_mask(grid, k)
    assert mask.shape == (12, 12)
    for i in range(12):
        for j in range(12):
            near = abs(i // 4 - j // 4) <= 1 and abs(i % 4 - j % 4) <= 1
            assert (mask[i, j] == float("-inf")) == near, (i, j)


def test_masked_attention_ignores_the_neighbourhood():
    """With the mask, a query's output does not depend on its neighbours' values, and does on the others'."""
    torch.manual_seed(0)
    att = Attention(8, 2).eval()
    grid = (4, 4)
    mask = neighbour_mask(grid, 3)
    x = torch.randn(1, 16, 8)
    q = 5  # row 1, col 1: its neighbourhood is rows 0-2 x cols 0-2
    base = att(x, x, x, mask)[0, q]
    v_near, v_far = x.clone(), x.clone()
    v_near[0, 10] += 5.0  # row 2, col 2: a neighbour
    v_far[0, 15] += 5.0  # row 3, col 3: outside
    torch.testing.assert_close(att(x, x, v_near, mask)[0, q], base)
    assert not torch.allclose(att(x, x, v_far, mask)[0, q], base)
    assert not torch.allclose(att(x, x, v_near, None)[0, q], att(x, x, x, None)[0, q])


def test_neighbour_mask_switch():
    on, off = _model(), _model(neighbor_mask=False)
    assert on.attn_mask is not None and off.attn_mask is None and off.neighbor_size == 0
    assert _model(neighbor_size=3).neighbor_size == 3
    with pytest.raises(ValueError, match="odd"):
        _model(neighbor_size=4)
    with pytest.raises(ValueError, match="whole"):
        _model(neighbor_size=9)


def test_learned_query_switch():
    on, off = _model(learned_query=True), _model()  # off by default (painted validation, docs/uniad.md)
    assert "decoder.0.query" in on.state_dict() and "decoder.0.query" not in off.state_dict()
    assert on.decoder[0].query.shape == (64, 16)
    # without learned queries the decoder starts from the encoder output: the input reaches every layer's query
    f = torch.randn(2, off.channels, 8, 8)
    assert off.eval().reconstruct(f).shape == f.shape


def test_feature_jitter_switch_and_scale():
    f = torch.randn(2, _model().channels, 8, 8)
    for jitter in (True, False):
        m = _model(feature_jitter=jitter, dropout=0.0).train()
        a, b = m.reconstruct(f), m.reconstruct(f)
        assert torch.equal(a, b) != jitter  # noise only when switched on
        m.eval()
        assert torch.equal(m.reconstruct(f), m.reconstruct(f))  # never at inference
    tokens = torch.ones(4, 100, 50) * 3.0  # norm = 3 * sqrt(50); noise std = norm / D * scale
    noise = jitter_tokens(tokens, 20.0, torch.Generator().manual_seed(0)) - tokens
    assert float(noise.std()) == pytest.approx(3.0 * 50 ** 0.5 / 50 * 20.0, rel=0.05)


def test_multiclass_training_records_classes(tmp_path):
    logging.getLogger("train").setLevel(logging.WARNING)
    from runtime.synthetic import write_dataset
    from train.loop import TrainConfig, load_checkpoint, run_outputs, train

    dirs = [write_dataset(tmp_path / name, size=64, n_train=20, n_test_good=2, n_per_defect=1, seed=i, product=name)
            for i, name in enumerate(("board", "tray"))]
    kw = {k: v for k, v in TINY.items() if k != "pretrained"}
    cfg = TrainConfig(data=[str(d) for d in dirs], out=str(tmp_path / "run"), model="uniad", image_size=64, steps=4,
                      batch_size=2, pretrained=False, save_every=0, model_kwargs=kw)
    ckpt = train(cfg)
    model, blob = load_checkpoint(ckpt)
    assert blob["family"] == "uniad" and blob["classes"] == ["board", "tray"]
    assert blob["train"]["n_fit"] == 36 and blob["train"]["final_loss"]["step"] == 4
    assert bool(model.calibrated) and float(model.feature_std.min()) > 0
    frames = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8).numpy()
    assert run_outputs(model, frames, "cpu", keys=("image_score",))["image_score"].shape == (2,)
    # each class ships its own threshold, fitted on its held-out validation images; export carries them
    per_class = blob["thresholds"]["per_class"]
    assert sorted(per_class) == ["board", "tray"] and all(np.isfinite(v) for v in per_class.values())
    from export.onnx_export import export_onnx
    from runtime.model import Model

    onnx_path = export_onnx(ckpt, tmp_path / "uni.onnx")
    deployed = Model(onnx_path, class_name="tray")
    assert deployed.threshold == pytest.approx(per_class["tray"]) and deployed.sidecar.thresholds.per_class == per_class
    # settings are chosen per class on painted validation defects, each class on its own held-out images
    from benchmarks.multiclass import painted_per_class

    pv = painted_per_class(model, cfg.data, "64", 0)
    assert pv["board"]["n_good"] == 2 and pv["tray"]["n_good"] == 2 and pv["board"]["n_painted"] > 0
    score = pv["board"]["image_score"]
    assert 0.0 <= score["pixel_auroc"] <= 1.0 and 0.0 <= score["aupro"] <= 1.0
    assert pv["mean_image_plus_pixel_auroc"] == pytest.approx(np.mean(
        [pv[c]["image_score"]["image_auroc"] + pv[c]["image_score"]["pixel_auroc"] for c in ("board", "tray")]))


def test_multiclass_benchmark_deploys_each_class_at_its_own_threshold():
    from benchmarks.multiclass import class_threshold

    blob = {"thresholds": {"image": 1.0, "per_class": {"board": 2.0}}}
    assert class_threshold(blob, "board") == 2.0 and class_threshold(blob, "tray") == 1.0
    assert class_threshold({"thresholds": {"image": 0.5}}, "board") == 0.5


def test_per_class_thresholds_come_from_each_classs_own_held_out_scores(caplog):
    from calibration.fitting import threshold_at_fpr
    from train.loop import per_class_thresholds

    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 40), rng.normal(5, 1, 6)  # class b scores higher and has few images
    scores = np.r_[a[:20], b, a[20:]]
    classes = ["a"] * 20 + ["b"] * 6 + ["a"] * 20
    with caplog.at_level(logging.WARNING, logger="train.loop"):
        thr = per_class_thresholds(scores, classes, 0.01)
    assert thr == {"a": threshold_at_fpr(a, 0.01).image, "b": threshold_at_fpr(b, 0.01).image}
    assert thr["b"] > thr["a"] and "class b" in caplog.text and "class a" not in caplog.text
    with pytest.raises(ValueError, match="class labels"):
        per_class_thresholds(scores[:-1], classes, 0.01)


def test_multiclass_benchmark_merges_only_the_same_experiment():
    from benchmarks.multiclass import merge_results

    base = {"classes": ["a", "b"], "image_size": "256", "steps_per_class": 10, "batch_size": 8, "seed": 0}
    row = lambda x: {"image_auroc": x, "pixel_auroc": x, "aupro": x, "f1_max": x}  # noqa: E731
    uni = {**base, "uniad": {"per_class": {"a": row(0.9), "b": row(0.7)}}}
    eff = {**base, "efficientad_per_class": {"per_class": {"a": row(0.8)}}}  # b not finished
    m = merge_results(uni, eff)
    assert m["compared_classes"] == ["a"]
    assert m["uniad_minus_efficientad_mean"]["image_auroc"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="steps_per_class"):
        merge_results(uni, {**eff, "steps_per_class": 20})
    with pytest.raises(ValueError, match="UniAD result first"):
        merge_results(eff, uni)


def test_multiclass_benchmark_resumes_only_the_same_experiment():
    from benchmarks.multiclass import resumable_state

    settings = {"classes": ["a", "b"], "image_size": "256", "steps_per_class": 10, "batch_size": 8, "seed": 0,
                "uniad_kwargs": {}}
    eff = {"per_class": {"a": {"image_auroc": 0.8}}, "train_seconds": 5.0}
    previous = {**settings, "command": "x", "efficientad_per_class": eff}
    assert resumable_state(previous, settings) == {"efficientad_per_class": eff}
    with pytest.raises(ValueError, match="image_size"):
        resumable_state({**previous, "image_size": "192"}, settings)
    with pytest.raises(ValueError, match="uniad_kwargs"):
        resumable_state({**previous, "uniad_kwargs": {"hidden": 256}}, settings)
