"""The memory-bank family: nearest-neighbour graph, coreset, export parity, torch-free memory refits."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from tests.torch_free import run_torch_free
from calibration.fitting import CalibrationError
from calibration.memory import MemorySpec, greedy_coreset, memory_matrix
from calibration.metrics import auroc
from runtime.artifact import read_sidecar, sidecar_path
from runtime.dataset import open_dataset
from runtime.model import Model
from train.data import load_frames
from train.models import create_model
from train.models.patchcore import NearestNeighbour

IMAGE_SIZE = 64
ROOT = Path(__file__).resolve().parents[1]


def _memory(onnx_path: Path) -> np.ndarray:
    inits = {i.name: i for i in onnx.load(str(onnx_path)).graph.initializer}
    return numpy_helper.to_array(inits["memory_bank"])


def test_nearest_neighbour_is_the_brute_force_distance_and_padding_rows_change_nothing():
    g = torch.Generator().manual_seed(0)
    mem = torch.randn(37, 5, generator=g)
    feats = torch.randn(2, 5, 3, 4, generator=g)
    nn_ = NearestNeighbour(64, 5)
    nn_.memory_bank.copy_(torch.from_numpy(memory_matrix(mem.numpy(), 64)))
    got = nn_(feats)
    a = feats.permute(0, 2, 3, 1).reshape(-1, 5)
    want = torch.cdist(a, mem).amin(1).reshape(2, 1, 3, 4)
    assert got.shape == (2, 1, 3, 4)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(CalibrationError, match="capacity"):
        memory_matrix(mem.numpy(), 16)


def test_reweighting_is_patchcores_formula_over_the_nearest_items_neighbourhood():
    from calibration.memory import item_neighbours

    g = torch.Generator().manual_seed(1)
    mem = torch.randn(37, 5, generator=g).double()
    feats = torch.randn(2, 5, 3, 4, generator=g)
    k = 4
    bank = memory_matrix(mem.float().numpy(), 64, neighbours=k)
    assert bank.shape == (5 + 1 + k, 64)
    # neighbour rows: each item's k nearest items, itself first; unused columns repeat item 0's
    want_nb = torch.cdist(mem, mem).argsort(dim=1)[:, :k].numpy()
    np.testing.assert_array_equal(bank[6:, :37].T.astype(np.int64), want_nb)
    np.testing.assert_array_equal(item_neighbours(mem.numpy(), k), want_nb)
    assert (bank[6:, 37:] == bank[6:, :1]).all()
    nn_ = NearestNeighbour(64, 5, neighbours=k)
    nn_.memory_bank.copy_(torch.from_numpy(bank))
    got = nn_(feats).double().reshape(-1)
    a = feats.permute(0, 2, 3, 1).reshape(-1, 5).double()
    d = torch.cdist(a, mem)  # [P,37]
    star = d.argmin(1)
    hood = torch.gather(d, 1, torch.from_numpy(want_nb)[star])  # distances of each patch to N_k(b*)
    want = d.min(1).values * (1 - torch.exp(d.min(1).values) / torch.exp(hood).sum(1))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got < d.min(1).values).all() and (got >= d.min(1).values * (1 - 1 / k) - 1e-5).all()
    # fewer items than neighbours: the farthest repeats
    np.testing.assert_array_equal(item_neighbours(np.array([[0.0], [1.0], [3.0]]), 5), [[0, 1, 2, 2, 2], [1, 0, 2, 2, 2], [2, 1, 0, 0, 0]])
    with pytest.raises(ValueError, match="reweight_neighbours"):
        NearestNeighbour(64, 5, neighbours=1)


def test_reweighted_memory_exports_with_parity_and_refits_torch_free(pc_dataset, tmp_path):
    """The neighbour indices live in the one memory initializer: export keeps parity, and a torch-free
    refit writes new items with their own neighbourhoods, scored by the deployed graph as calibration said."""
    import cv2

    from calibration.memory import item_neighbours
    from export.onnx_export import export_onnx
    from train.loop import TrainConfig, load_checkpoint, run_outputs, train

    k = 3
    ckpt = train(TrainConfig(data=str(pc_dataset), out=str(tmp_path / "run"), model="patchcore_lite0",
                             image_size=IMAGE_SIZE, model_kwargs={"memory_size": 128, "reweight_neighbours": k}))
    onnx_path = export_onnx(ckpt, tmp_path / "model.onnx", batch="dynamic")
    model, _ = load_checkpoint(ckpt)
    frames = load_frames([s.path for s in open_dataset(pc_dataset).test], IMAGE_SIZE)
    keys = ("anomaly_map", "image_score", "raw_maps")
    ref = run_outputs(model, frames, "cpu", keys=keys)
    out = Model(onnx_path, warmup=0).infer(frames)
    for key in keys:
        assert np.abs(out[key] - ref[key]).max() <= 1e-4 * max(1.0, np.abs(ref[key]).max()), key
    assert MemorySpec.from_sidecar(read_sidecar(onnx_path)).neighbours == k
    good = tmp_path / "good"
    good.mkdir()
    for p in sorted((pc_dataset / "train" / "good").glob("*.png"))[::2]:
        shutil.copy2(p, good / p.name)
    after = _refit_torch_free(onnx_path, good, tmp_path / "good_scores.npy")
    c = model.channels
    rows = int(read_sidecar(onnx_path).provenance["calibration"]["memory"]["rows"])
    np.testing.assert_array_equal(after[c + 1:, :rows].T.astype(np.int64), item_neighbours(after[:c, :rows].T, k))
    m = Model(onnx_path, warmup=0)
    imgs = [cv2.imread(str(p)) for p in sorted(good.glob("*.png"))]
    np.testing.assert_allclose(m.predict(imgs).image_score, np.load(tmp_path / "good_scores.npy"), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("projection", [None, 2])
def test_greedy_coreset_covers_every_cluster(projection):
    rng = np.random.default_rng(0)
    centers = np.array([[0, 0, 0, 0], [50, 0, 0, 0], [0, 50, 0, 0], [0, 0, 50, 50]], np.float32)
    x = np.concatenate([c + rng.standard_normal((200, 4)).astype(np.float32) for c in centers])
    idx = greedy_coreset(x, 4, projection_dim=projection, progress=False)
    assert sorted(set(i // 200 for i in idx)) == [0, 1, 2, 3]  # one from each cluster, none twice


@pytest.fixture(scope="module")
def pc_dataset(tmp_path_factory):
    from runtime.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("pcdata") / "tray", size=96, n_train=40, n_test_good=12,
                         n_per_defect=4, seed=3, defects=("scratch", "spot", "crack"), product="tray")


@pytest.fixture(scope="module")
def pc_checkpoint(tmp_path_factory, pc_dataset):
    from train.loop import TrainConfig, train

    out = tmp_path_factory.mktemp("pcrun")
    cfg = TrainConfig(data=str(pc_dataset), out=str(out), model="patchcore_lite0", image_size=IMAGE_SIZE,
                      model_kwargs={"memory_size": 256, "coreset_ratio": 0.1, "global_gaussian": True})
    return train(cfg)


@pytest.fixture(scope="module")
def pc_onnx(tmp_path_factory, pc_checkpoint):
    from export.onnx_export import export_onnx

    return export_onnx(pc_checkpoint, tmp_path_factory.mktemp("pcexp") / "model.onnx", batch="dynamic")


@pytest.fixture()
def pc_copy(tmp_path, pc_onnx):
    dst = tmp_path / "model.onnx"
    shutil.copy2(pc_onnx, dst)
    shutil.copy2(sidecar_path(pc_onnx), sidecar_path(dst))
    return dst


def test_trained_memory_and_export_parity(pc_checkpoint, pc_onnx, pc_dataset):
    from train.loop import load_checkpoint, run_outputs

    model, blob = load_checkpoint(pc_checkpoint)
    assert blob["family"] == "patchcore"
    assert blob["train"]["memory_rows"] == min(256, round(0.1 * blob["train"]["patches"]))
    ds = open_dataset(pc_dataset)
    frames = load_frames([s.path for s in ds.test], IMAGE_SIZE)
    labels = np.array([s.label for s in ds.test])
    keys = ("anomaly_map", "image_score", "map_score", "raw_maps", "patch_features")
    ref = run_outputs(model, frames, "cpu", keys=keys)
    out = Model(pc_onnx, warmup=0).infer(frames)
    for k in keys:
        assert np.abs(out[k] - ref[k]).max() <= 1e-4 * max(1.0, np.abs(ref[k]).max()), k
    assert round(auroc(labels, out["image_score"]), 3) == round(auroc(labels, ref["image_score"]), 3)
    # the memory is a named initializer holding the trained buffer; the sidecar declares it
    np.testing.assert_array_equal(_memory(pc_onnx), model.knn.memory_bank.numpy())
    sc = read_sidecar(pc_onnx)
    assert "memory_bank" in sc.calibration_initializers and sc.roles["patch_features"] == "raw"
    spec = MemorySpec.from_sidecar(sc)
    assert (spec.initializer, spec.capacity, spec.dim) == ("memory_bank", 256, model.channels)
    # the default coreset search runs on exact distances, and field refits read the same from the sidecar
    assert model.cfg.projection_dim == 0 and spec.projection_dim is None


def test_first_calibration_uses_every_training_image_out_of_sample(pc_checkpoint, pc_dataset):
    """The memory holds the training images, so only maps of images outside it are fair; the head is fit on
    2-fold held-out maps of all of them (as a field refit does), not on the 10 % validation split alone."""
    from train.loop import load_checkpoint

    model, blob = load_checkpoint(pc_checkpoint)
    n_train = len(open_dataset(pc_dataset).train)
    assert blob["train"]["n_fit"] < n_train  # a validation split was held out ...
    assert blob["gaussian"]["n_images"] == n_train  # ... and the head still saw every image, out-of-sample


def _torch_free(code: str) -> subprocess.CompletedProcess:
    """Run code with torch made unimportable (what a line PC without torch sees)."""
    return run_torch_free(code)


def _refit_torch_free(onnx_path: Path, good: Path, scores_npy: Path) -> np.ndarray:
    """``calibration.field.calibrate`` with torch unimportable; saves the good images' reported scores to
    ``scores_npy`` and returns the new memory initializer (checked to have changed, in the same shape)."""
    before = _memory(onnx_path)
    r = _torch_free(f"from calibration.field import calibrate\n"
                    f"import numpy as np\n"
                    f"res = calibrate({str(onnx_path)!r}, {str(good)!r})\n"
                    f"np.save({str(scores_npy)!r}, res.good_scores)\n")
    assert r.returncode == 0, r.stderr[-2000:]
    after = _memory(onnx_path)
    assert after.shape == before.shape and not np.array_equal(after, before)
    return after


def test_onboarding_a_new_product_swaps_the_memory_torch_free_and_scores_as_calibrated(pc_copy, tmp_path):
    from runtime.synthetic import write_dataset

    # a product the model never saw: boards instead of trays
    new = write_dataset(tmp_path / "board", size=96, n_train=40, n_test_good=12, n_per_defect=4, seed=5,
                         defects=("scratch", "spot", "crack"), product="board")
    ds = open_dataset(new)
    tests = [s for s in ds.test]
    labels = np.array([s.label for s in tests])
    import cv2

    after_mem = _refit_torch_free(pc_copy, new / "train" / "good", tmp_path / "good_scores.npy")
    np.testing.assert_allclose(after_mem[-1], (after_mem[:-1].astype(np.float64) ** 2).sum(0), rtol=1e-5)
    sc = read_sidecar(pc_copy)  # hash re-stamped: the model and its sidecar were rewritten together
    assert sc.provenance["calibration"]["memory"]["rows"] == min(256, round(0.1 * 40 * 8 * 8))
    assert pc_copy.with_name("model.onnx.bak").exists()
    m = Model(pc_copy, warmup=0)
    # the deployed model gives the calibration images the scores calibration reported
    good = [cv2.imread(str(p)) for p in sorted((new / "train" / "good").glob("*.png"))]
    np.testing.assert_allclose(m.predict(good).image_score, np.load(tmp_path / "good_scores.npy"), rtol=1e-4, atol=1e-5)
    # and it now separates the new product's good and defective parts
    scores = m.predict([cv2.imread(str(s.path)) for s in tests]).image_score
    assert auroc(labels, scores) >= 0.9, auroc(labels, scores)


def test_failed_memory_refit_leaves_the_artifact_byte_identical(pc_copy, pc_dataset, tmp_path):
    model_bytes, side_bytes = pc_copy.read_bytes(), sidecar_path(pc_copy).read_bytes()
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted((pc_dataset / "train" / "good").glob("*.png"))[:3]:
        shutil.copy2(p, few / p.name)
    r = _torch_free(f"from calibration.cli import main\nraise SystemExit(main(['fit', '--model', {str(pc_copy)!r}, "
                    f"'--good', {str(few)!r}]))")
    assert r.returncode == 2 and "at least 4" in r.stderr, r.stderr[-2000:]
    assert pc_copy.read_bytes() == model_bytes and sidecar_path(pc_copy).read_bytes() == side_bytes


def test_a_grey_product_onboards_onto_a_colour_trained_memory_and_sets_the_colour_check(pc_copy, pc_dataset, tmp_path):
    """Onboarding refits the memory from the new product's images, so their camera setting (grey) becomes the
    model's: accepted and recorded in the sidecar (a threshold-only refit of a graph without a memory still
    refuses grey images for a colour model: tests/test_calibration.py)."""
    import cv2

    from calibration.field import calibrate

    assert read_sidecar(pc_copy).provenance["source_colour"] is True
    grey = tmp_path / "grey"
    grey.mkdir()
    for p in sorted((pc_dataset / "train" / "good").glob("*.png"))[:12]:
        cv2.imwrite(str(grey / p.name), cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2GRAY))
    res = calibrate(pc_copy, str(grey))
    assert res.memory["n_images"] == 12
    sc = read_sidecar(pc_copy)
    assert sc.provenance["source_colour"] is False
    assert sc.provenance["calibration"]["memory"]["n_images"] == 12


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="lite0 or lite2"):
        create_model("patchcore_lite", image_size=IMAGE_SIZE, pretrained=False, backbone="resnet")
    with pytest.raises(ValueError, match="stride"):
        create_model("patchcore_lite", image_size=IMAGE_SIZE, pretrained=False, stride=2)


def test_backbone_model_arg_reaches_the_config():
    """``--model-arg backbone=lite0`` on a Lite2-default family builds the Lite0 trunk (152 channels, not 168)."""
    for name in ("patchcore_lite", "crossclass_lite"):
        m = create_model(name, image_size=IMAGE_SIZE, pretrained=False, backbone="lite0")
        assert m.cfg.backbone == "lite0" and m.channels == 152, name
    assert create_model("patchcore_lite", image_size=IMAGE_SIZE, pretrained=False).channels == 168


def test_each_model_has_its_own_default_input_size():
    """`train` without --image-size builds each model at its builder's default (the memory bank's was
    chosen on painted-validation sweeps, benchmarks/memory_bank_sweep.py); an unknown name is refused."""
    from train.loop import TrainConfig
    from train.models import default_image_size

    assert TrainConfig(data="d", out="o").image_size is None
    assert default_image_size("patchcore_lite") == 384
    assert default_image_size("efficientad_lite") == 256
    with pytest.raises(KeyError, match="unknown model"):
        default_image_size("nope")


def test_gated_gaussian_on_the_mean_feature_sees_logical_anomalies_the_map_misses(pc_checkpoint, tmp_path):
    """Trays with a pellet too many, one missing or the wrong mix: every patch looks normal, the mean feature
    moves. The fitted Gaussian score must rank them above good trays, where the nearest-patch map cannot."""
    from runtime.synthetic import write_dataset
    from train.loop import load_checkpoint, run_outputs

    model, blob = load_checkpoint(pc_checkpoint)
    assert model.cfg.global_gaussian and blob["gaussian"]["dim"] == model.channels
    assert blob["score"]["puad_weight"] > 0  # enough training images: the Gaussian counts
    data = write_dataset(tmp_path / "tray", size=96, n_train=1, n_test_good=16, n_per_defect=8, seed=11,
                         defects=("extra", "missing", "wrong_mix"), product="tray")
    tests = open_dataset(data).test
    labels = np.array([s.label for s in tests])
    frames = load_frames([s.path for s in tests], model.cfg.image_size, "test")
    out = run_outputs(model, frames, "cpu", keys=("map_score", "gaussian_score", "image_score"))
    gauss, maps = auroc(labels, out["gaussian_score"]), auroc(labels, out["map_score"])
    assert gauss > 0.65 and gauss > maps + 0.15, (gauss, maps)  # tiny model (lite0, 96 px, 40 images): 0.73 vs 0.48
    assert auroc(labels, out["image_score"]) > maps, (auroc(labels, out["image_score"]), maps)


def test_checkpoints_from_before_the_gaussian_load_as_map_only_models():
    from train.models.patchcore import PatchCoreConfig

    old = PatchCoreConfig(name="patchcore_lite0", backbone="lite0", pretrained=False).to_dict()
    del old["global_gaussian"]
    assert PatchCoreConfig.from_dict(old).global_gaussian is False
    m = create_model("patchcore_lite0", image_size=64, pretrained=False, memory_size=8, global_gaussian=False)
    assert m.head.feature_dim == 0 and "gaussian_score" not in m.output_names()
    # new models carry the Gaussian, switched by the layout at calibration
    m = create_model("patchcore_lite0", image_size=64, pretrained=False, memory_size=8)
    assert m.cfg.global_gaussian == "auto" and m.head.feature_dim == m.channels
    assert m.family_params()["gaussian"] == {"optional": True, "switch": "layout"}
    with pytest.raises(ValueError, match="auto, true or false"):
        create_model("patchcore_lite0", image_size=64, pretrained=False, global_gaussian="sometimes")
