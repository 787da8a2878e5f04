"""The multi-class benchmark generator (runtime.synthetic_classes): seeded, MVTec layout, exact masks."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from runtime.dataset import open_dataset, read_image, read_mask
from runtime.synthetic_classes import CLASSES, REAL_SOURCES, SYNTHETIC, _rng, main, make_sample, write_classes

HAVE_SKIMAGE = importlib.util.find_spec("skimage") is not None
ALL = SYNTHETIC + (REAL_SOURCES if HAVE_SKIMAGE else ())
SIZE = 64


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    return write_classes(tmp_path_factory.mktemp("multi"), ALL, SIZE, n_train=2, n_test_good=1, n_per_defect=1, seed=3)


def test_enough_classes_of_each_kind():
    kinds = [c.kind for c in CLASSES.values()]
    assert kinds.count("object") >= 3 and kinds.count("texture") >= 3 and kinds.count("real_texture") >= 3
    for spec in CLASSES.values():
        assert len(spec.defects) >= 4, spec.name


def test_layout_reads_as_mvtec_with_every_class_and_defect(written):
    index = json.loads((written / "manifest.json").read_text())
    assert list(index["classes"]) == list(ALL)
    for name in ALL:
        ds = open_dataset(written / name)
        spec = CLASSES[name]
        assert len(ds.train) == 2
        assert ds.defect_types == sorted(spec.defects)
        h, w = spec.shape(SIZE)
        for s in ds.test:
            img = read_image(s.path)
            assert img.shape == (h, w, 3), (name, s.path)
            mask = read_mask(s, h, w)
            assert (mask.sum() > 0) == (s.label == 1), (name, s.defect)
    assert CLASSES["connector"].shape(SIZE) == (SIZE // 2, SIZE)  # the non-square class


@pytest.mark.skipif(not HAVE_SKIMAGE, reason="scikit-image not installed: real textures not written")
def test_real_textures_are_grey_files(written):
    import cv2

    for name in REAL_SOURCES:
        first = sorted((written / name / "train" / "good").glob("*.png"))[0]
        assert cv2.imread(str(first), cv2.IMREAD_UNCHANGED).ndim == 2


def test_same_seed_same_bytes_other_seed_other_bytes_subset_unchanged(written, tmp_path):
    again = write_classes(tmp_path / "again", ("screw", "fabric"), SIZE, 2, 1, 1, seed=3)
    full = _digest(written)
    for k, v in _digest(again).items():  # fewer classes: the written ones are byte-identical
        assert full[k] == v, k
    other = write_classes(tmp_path / "other", ("screw",), SIZE, 2, 1, 1, seed=4)
    assert _digest(other)["screw/train/good/000.png"] != full["screw/train/good/000.png"]


def test_good_images_vary():
    for name in SYNTHETIC:
        a = make_sample(name, "good", SIZE, _rng(0, name, "train", "good", 0), "train").image
        b = make_sample(name, "good", SIZE, _rng(0, name, "train", "good", 1), "train").image
        assert np.abs(a.astype(int) - b).mean() > 1.0, name


@pytest.mark.parametrize("name", ALL)
def test_masks_hold_exactly_the_changed_pixels(name):
    """Against the same scene without the defect: nothing changes outside the mask, most of the mask changes."""
    for defect in CLASSES[name].defects:
        for i in range(2):
            s = make_sample(name, defect, SIZE, _rng(1, name, "test", defect, i))
            m = s.mask > 0
            assert s.mask.dtype == np.uint8 and set(np.unique(s.mask)) <= {0, 255}
            assert m.sum() >= 12, (name, defect)
            if s.good is None:  # board/tray's own defects come from runtime.synthetic without a twin
                continue
            diff = np.abs(s.image.astype(int) - s.good.astype(int)).reshape(*m.shape, -1).max(-1)
            assert not (diff[~m] > 0).any(), (name, defect)
            assert (diff[m] > 0).mean() > 0.8, (name, defect)


def test_bad_requests_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown class"):
        make_sample("spanner")
    with pytest.raises(ValueError, match="no defect"):
        make_sample("screw", "bent_pin")
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), "--classes", "spanner"])
    assert e.value.code == 2
    assert main(["--list"]) == 0


def test_generator_imports_without_torch_or_scikit_image():
    import subprocess
    import sys

    code = ("import sys, runtime.synthetic_classes; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'sklearn', 'skimage', 'calibration')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_board_and_tray_keep_runtime_synthetic_defect_names():
    from runtime.synthetic import LOGICAL, STRUCTURAL, TRAY_LOGICAL

    assert set(CLASSES["board"].defects) == set(STRUCTURAL + LOGICAL) | {"colour"}
    assert set(CLASSES["tray"].defects) == set(STRUCTURAL + TRAY_LOGICAL) | {"colour"}
