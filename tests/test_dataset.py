import cv2
import numpy as np
import pytest

from runtime.dataset import DatasetError, open_dataset, read_image, read_mask
from runtime.synthetic import LOGICAL, STRUCTURAL, make_part, write_dataset


def test_mvtec_layout_mixed_formats(tmp_path):
    root = tmp_path / "cat"
    (root / "train" / "good").mkdir(parents=True)
    (root / "test" / "good").mkdir(parents=True)
    (root / "test" / "crack").mkdir(parents=True)
    (root / "ground_truth" / "crack").mkdir(parents=True)
    rng = np.random.default_rng(0)
    cv2.imwrite(str(root / "train/good/000.png"), rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    cv2.imwrite(str(root / "train/good/001.jpg"), rng.integers(0, 255, (40, 50), dtype=np.uint8))  # grayscale
    cv2.imwrite(str(root / "train/good/002.bmp"), rng.integers(0, 255, (30, 30, 3), dtype=np.uint8))
    (root / "train/good/notes.txt").write_text("ignored")
    cv2.imwrite(str(root / "test/good/000.png"), rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    cv2.imwrite(str(root / "test/crack/000.png"), rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    m = np.zeros((40, 50), np.uint8)
    m[10:20, 10:20] = 255
    cv2.imwrite(str(root / "ground_truth/crack/000_mask.png"), m)
    ds = open_dataset(root)
    assert len(ds.train) == 3 and len(ds.test) == 2 and ds.defect_types == ["crack"]
    for p in ds.train:
        img = read_image(p)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    bad = [s for s in ds.test if s.label == 1][0]
    mask = read_mask(bad, 20, 25)
    assert mask.shape == (20, 25) and mask.sum() == 25
    good = [s for s in ds.test if s.label == 0][0]
    assert read_mask(good, 20, 25).sum() == 0


def test_loco_masks_are_united(tmp_path):
    root = tmp_path / "loco"
    for d in ("train/good", "validation/good", "test/good", "test/logical_anomalies", "ground_truth/logical_anomalies/000"):
        (root / d).mkdir(parents=True)
    img = np.full((20, 20, 3), 100, np.uint8)
    for d in ("train/good", "validation/good", "test/good", "test/logical_anomalies"):
        cv2.imwrite(str(root / d / "000.png"), img)
    a = np.zeros((20, 20), np.uint8)
    a[:5, :5] = 255
    b = np.zeros((20, 20), np.uint8)
    b[-5:, -5:] = 255
    cv2.imwrite(str(root / "ground_truth/logical_anomalies/000/000.png"), a)
    cv2.imwrite(str(root / "ground_truth/logical_anomalies/000/001.png"), b)
    ds = open_dataset(root)
    assert len(ds.validation) == 1
    s = [x for x in ds.test if x.label][0]
    assert read_mask(s, 20, 20).sum() == 50


def test_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        open_dataset(tmp_path / "missing")
    (tmp_path / "x").mkdir()
    with pytest.raises(DatasetError, match="no train/good"):
        open_dataset(tmp_path / "x")
    (tmp_path / "x/train/good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        open_dataset(tmp_path / "x")
    cv2.imwrite(str(tmp_path / "x/train/good/a.png"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match="no test images"):
        open_dataset(tmp_path / "x")
    (tmp_path / "x/train/good/b.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="not a readable image"):
        read_image(tmp_path / "x/train/good/b.png")


def test_synthetic_is_deterministic_with_exact_masks(tmp_path):
    a = write_dataset(tmp_path / "a", size=64, n_train=3, n_test_good=2, n_per_defect=2, seed=3)
    b = write_dataset(tmp_path / "b", size=64, n_train=3, n_test_good=2, n_per_defect=2, seed=3)
    for f in sorted(a.rglob("*.png")):
        assert f.read_bytes() == (b / f.relative_to(a)).read_bytes()
    rng = np.random.default_rng(0)
    for d in STRUCTURAL + LOGICAL:
        part = make_part(rng, 128, d)
        assert part.mask.any(), d
    assert not make_part(rng, 128, "good").mask.any()
    # a structural defect changes pixels inside its mask and (almost) nowhere else
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    good, spot = make_part(r1, 128, "good"), make_part(r2, 128, "spot")
    diff = np.abs(good.image.astype(int) - spot.image.astype(int)).sum(2) > 30
    assert diff[spot.mask > 0].mean() > 0.5


def test_a_parent_folder_stands_for_its_class_folders(tmp_path):
    from runtime.dataset import class_folders

    for name in ("tray", "board"):
        (tmp_path / "plant" / name / "train" / "good").mkdir(parents=True)
    (tmp_path / "plant" / "notes").mkdir()  # not a class: skipped
    single = tmp_path / "plant" / "tray"
    assert class_folders([tmp_path / "plant"]) == [tmp_path / "plant" / "board", single]
    assert class_folders([single]) == [single]  # a class folder is itself
    assert class_folders([tmp_path / "missing"]) == [tmp_path / "missing"]  # open_dataset explains later
    with pytest.raises(DatasetError, match="parent of class folders"):
        class_folders([tmp_path / "plant" / "notes"])


def test_train_cli_refuses_a_folder_without_classes(tmp_path, capsys):
    from train.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "parent of class folders" in capsys.readouterr().err
