"""Painted defects (calibration.synthetic_defects) and the map-smoothing choice made on them."""
from __future__ import annotations

import numpy as np
import pytest

from calibration.synthetic_defects import FAMILIES, paint_defects


def _frames(n=4, size=64, seed=0):
    rng = np.random.default_rng(seed)
    base = np.full((n, size, size, 3), 120, np.uint8)
    return np.clip(base + rng.integers(-10, 10, base.shape), 0, 255).astype(np.uint8)


def test_painted_defects_change_only_their_mask_and_are_seeded():
    frames = _frames()
    out, masks, fams = paint_defects(frames, per_image=3, seed=5)
    assert out.shape == (12, 64, 64, 3) and out.dtype == np.uint8 and masks.shape == (12, 64, 64)
    assert set(fams) == set(FAMILIES)
    for k in range(len(out)):
        m = masks[k].astype(bool)
        src = frames[k // 3]
        assert m.sum() >= 2, (k, fams[k])
        assert np.array_equal(out[k][~m], src[~m])  # nothing outside the ground truth changes
        assert np.abs(out[k][m].astype(int) - src[m]).mean() > 3  # and the inside does change
    again, masks2, _ = paint_defects(frames, per_image=3, seed=5)
    assert np.array_equal(again, out) and np.array_equal(masks2, masks)
    other, _, _ = paint_defects(frames, per_image=3, seed=6)
    assert not np.array_equal(other, out)


def test_painted_defects_reject_bad_frames():
    with pytest.raises(ValueError, match="uint8"):
        paint_defects(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="per_image"):
        paint_defects(_frames(), per_image=0)


def test_smoothing_choice_scores_every_candidate_and_sets_the_best(trained, synthetic_root):
    from .conftest import IMAGE_SIZE
    from runtime.dataset import open_dataset
    from train.data import load_frames, split_train_validation
    from train.loop import load_checkpoint
    from train.select_smoothing import choose_map_smoothing

    model, blob = load_checkpoint(trained)
    _, val_paths = split_train_validation(open_dataset(synthetic_root, require_test=False), 0)
    val = load_frames(val_paths, IMAGE_SIZE)
    choice = choose_map_smoothing(model, val, "cpu", candidates=(0.0, 4.0, 16.0), per_image=2)
    assert [r["sigma_px_at_256"] for r in choice.rows] == [0.0, 4.0, 16.0]
    best = max(choice.rows, key=lambda r: r["objective"])
    assert choice.sigma == best["sigma_px_at_256"] == model.cfg.map_blur_px
    assert choice.n_good == len(val) and choice.n_defect == 2 * len(val)
    for r in choice.rows:
        assert 0 <= r["aupro"] <= 1 and 0 <= r["image_auroc"] <= 1
    # a blunter map scores painted defects differently: the candidates are really applied
    assert len({round(r["pixel_auroc"], 6) for r in choice.rows}) > 1
    with pytest.raises(ValueError, match="at least 2"):
        choose_map_smoothing(model, val[:1], "cpu")


def test_map_blur_flag_values():
    from train.loop import parse_map_blur

    assert parse_map_blur("auto") == "auto" and parse_map_blur("AUTO") == "auto"
    assert parse_map_blur("4") == 4.0 and parse_map_blur("0") == 0.0
    for bad in ("-1", "nan", "soft"):
        with pytest.raises(ValueError, match="--map-blur"):
            parse_map_blur(bad)


def test_painted_validation_is_one_labelled_set_scored_per_output(trained, synthetic_root):
    """The one helper every chooser and benchmark ranks on: good frames labelled 0 with empty masks,
    painted frames labelled 1 with their masks; metrics per image score the model emits."""
    from .conftest import IMAGE_SIZE
    from runtime.dataset import open_dataset
    from train.data import load_frames, split_train_validation
    from train.loop import load_checkpoint
    from train.painted_validation import painted_set, painted_validation

    frames = _frames(3)
    both, labels, gt = painted_set(frames, per_image=2, seed=1)
    assert len(both) == len(labels) == len(gt) == 9 and labels.tolist() == [0] * 3 + [1] * 6
    assert not gt[:3].any() and all(m.any() for m in gt[3:])
    assert np.array_equal(both[:3], frames)
    with pytest.raises(ValueError, match="at least 2 validation images"):
        painted_set(frames[:1])
    model, _ = load_checkpoint(trained)
    _, val_paths = split_train_validation(open_dataset(synthetic_root, require_test=False), 0)
    r = painted_validation(model, load_frames(val_paths, IMAGE_SIZE), per_image=2)
    assert r["n_painted"] == 2 * r["n_good"] and {"map_score", "image_score"} <= set(r)
    for k in ("map_score", "image_score"):
        assert all(0.0 <= r[k][m] <= 1.0 for m in ("image_auroc", "pixel_auroc", "aupro"))


def test_lighting_validation_is_painted_validation_with_relit_goods(trained, synthetic_root):
    """At gain 1 it is exactly painted validation's image AUROC; other gains rescore only the good frames."""
    from .conftest import IMAGE_SIZE
    from runtime.dataset import open_dataset
    from train.data import load_frames, split_train_validation, with_gain
    from train.loop import load_checkpoint
    from train.painted_validation import painted_validation

    model, _ = load_checkpoint(trained)
    _, val_paths = split_train_validation(open_dataset(synthetic_root, require_test=False), 0)
    val = load_frames(val_paths, IMAGE_SIZE)
    plain = painted_validation(model, val, 2, 3)
    assert "lighting" not in plain
    same = painted_validation(model, val, 2, 3, light_gains=(1.0,))["lighting"]
    assert same["image_auroc"] == pytest.approx(plain["image_score"]["image_auroc"])
    assert same["per_gain"]["1.0"]["vs_goods"] == pytest.approx(0.5)  # relit by 1: the same scores
    r = painted_validation(model, val, 2, 3, light_gains=(0.5, 1.1), threshold=-np.inf)["lighting"]
    assert set(r["per_gain"]) == {"0.5", "1.1"} and r["n_painted"] == 2 * r["n_good"]
    assert r["image_auroc"] == pytest.approx(np.mean([g["vs_painted"] for g in r["per_gain"].values()]))
    assert all(g["false_alarm_rate"] == 1.0 for g in r["per_gain"].values())  # every score is above -inf
    assert np.array_equal(with_gain(np.full((1, 2, 2, 3), 200, np.uint8), 1.5), np.full((1, 2, 2, 3), 255, np.uint8))
