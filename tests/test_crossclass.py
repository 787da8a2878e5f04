"""The cross-class family: trained on some synthetic classes, onboarded torch-free to a class it never saw.

Tiny and fast (64 px, stride-8 tokens, a 1-layer predictor, a few dozen episodes): the plumbing and the
claim that onboarding alone (new prototypes + head fit from good images) makes the model separate the new
class's good and defective parts. Its accuracy at a real budget is measured in benchmarks/crossclass.py.
"""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.torch_free import run_torch_free
from calibration.memory import MemorySpec, kmeans
from calibration.metrics import auroc
from runtime.artifact import read_sidecar, sidecar_path

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
TINY = dict(backbone="lite0", stride=8, dim=32, heads=2, ff=64, layers=1, prototypes=32, episode_batch=4,
            proto_images=(5, 20), proto_sets=2)


def _prototypes(onnx_path: Path) -> np.ndarray:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(onnx_path))
    return next(numpy_helper.to_array(i) for i in m.graph.initializer if i.name == "prototypes")


def _torch_free(code: str) -> subprocess.CompletedProcess:
    """Run code with torch made unimportable (what a line PC without torch sees)."""
    return run_torch_free(code)


def test_mask_groups_cover_every_patch_once():
    from train.models.crossclass import mask_groups

    for g in (1, 2, 4):
        m = mask_groups((8, 6), g)
        assert m.shape == (g, 48) and bool((m.sum(0) == 1).all())
    # with 4 groups no masked patch has a masked 4-neighbour outside its own 2x2 block
    m = mask_groups((8, 8), 4).reshape(4, 8, 8)
    assert float(m[0].sum()) == 16 and m[0, 0, 0] == m[0, 1, 1] == 1 and m[0, 0, 2] == 0


def test_kmeans_finds_separated_clusters_and_pads_small_inputs():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (5, 8)).astype(np.float32)
    x = np.concatenate([c + rng.normal(0, 0.1, (200, 8)) for c in centres]).astype(np.float32)
    found = kmeans(x, 5, iterations=20, seed=1)
    d = np.sqrt(((found[:, None] - centres[None]) ** 2).sum(-1))
    assert d.min(axis=0).max() < 0.1  # every true centre recovered
    assert kmeans(x[:3], 5).shape == (3, 8)


@pytest.fixture(scope="module")
def classes(tmp_path_factory) -> Path:
    from runtime.synthetic_classes import write_class

    root = tmp_path_factory.mktemp("ccdata")
    for c in ("tray", "fabric"):
        write_class(root, c, size=96, n_train=30, n_test_good=4, n_per_defect=2, seed=1)
    write_class(root, "board", size=96, n_train=40, n_test_good=16, n_per_defect=4, seed=2,
                defects=("scratch", "spot", "crack"))  # (a faint discolouration is missed at 64 px)
    return root


@pytest.fixture(scope="module")
def cc_onnx(tmp_path_factory, classes) -> Path:
    logging.getLogger("train").setLevel(logging.WARNING)
    from export.onnx_export import export_onnx
    from train.loop import TrainConfig, train

    out = tmp_path_factory.mktemp("ccrun")
    cfg = TrainConfig(data=[str(classes / "tray"), str(classes / "fabric")], out=str(out), model="crossclass_lite",
                      image_size=SIZE, steps=40, seed=0, save_every=0, model_kwargs=dict(TINY))
    ckpt = train(cfg)
    return export_onnx(ckpt, out / "model.onnx", batch="dynamic")


def test_trained_on_two_classes_and_declares_a_kmeans_memory(cc_onnx):
    import torch

    blob = torch.load(cc_onnx.parent / "checkpoint.pt", weights_only=True)
    assert blob["family"] == "crossclass" and blob["train"]["classes"] == ["fabric", "tray"]
    spec = MemorySpec.from_sidecar(read_sidecar(cc_onnx))
    assert (spec.initializer, spec.method, spec.capacity) == ("prototypes", "kmeans", 32)


def test_onboarding_an_unseen_class_torch_free_separates_its_defects(cc_onnx, classes, tmp_path):
    import shutil

    import cv2

    from runtime.dataset import open_dataset
    from runtime.model import Model

    dst = tmp_path / "model.onnx"
    shutil.copy2(cc_onnx, dst)
    shutil.copy2(sidecar_path(cc_onnx), sidecar_path(dst))
    before = _prototypes(dst)
    board = classes / "board"
    r = _torch_free(f"from calibration.cli import main\nraise SystemExit(main(['fit', '--model', {str(dst)!r}, "
                    f"'--good', {str(board / 'train' / 'good')!r}]))")
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"method": "kmeans"' in r.stdout and '"seconds"' in r.stdout
    assert "recommended" in r.stderr  # 40 images: the advice to use 50-100 is printed
    after = _prototypes(dst)
    assert after.shape == before.shape and not np.array_equal(after, before)
    np.testing.assert_allclose(after[-1], (after[:-1].astype(np.float64) ** 2).sum(0), rtol=1e-5)
    assert dst.with_name("model.onnx.bak").exists()
    assert read_sidecar(dst).provenance["calibration"]["memory"]["method"] == "kmeans"
    tests = open_dataset(board).test
    labels = np.array([s.label for s in tests])
    scores = Model(dst, warmup=0).predict([cv2.imread(str(s.path)) for s in tests]).image_score
    assert auroc(labels, scores) >= 0.8, auroc(labels, scores)


def test_too_few_images_are_refused_and_few_are_warned(cc_onnx, classes, tmp_path):
    import shutil

    dst = tmp_path / "model.onnx"
    shutil.copy2(cc_onnx, dst)
    shutil.copy2(sidecar_path(cc_onnx), sidecar_path(dst))
    model_bytes = dst.read_bytes()
    for n, ok in ((3, False), (6, True)):
        few = tmp_path / f"few{n}"
        few.mkdir()
        for p in sorted((classes / "board" / "train" / "good").glob("*.png"))[:n]:
            shutil.copy2(p, few / p.name)
        r = _torch_free(f"from calibration.cli import main\nraise SystemExit(main(['fit', '--model', {str(dst)!r}, "
                        f"'--good', {str(few)!r}, '--dry-run']))")
        if ok:
            assert r.returncode == 0 and "only 6 good images" in r.stderr, r.stderr[-2000:]
        else:
            assert r.returncode == 2 and "at least 4" in r.stderr, r.stderr[-2000:]
    assert dst.read_bytes() == model_bytes


def test_config_errors_are_clear():
    from train.models import create_model

    with pytest.raises(ValueError, match="lite0 or lite2"):
        create_model("crossclass_lite", image_size=SIZE, pretrained=False, backbone="resnet")
    with pytest.raises(ValueError, match="mask_groups"):
        create_model("crossclass_lite", image_size=SIZE, pretrained=False, mask_groups=3)
