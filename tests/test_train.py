"""Fast-schedule training on synthetic parts (CPU): shapes, loss decrease, ordering, reproducibility."""
import json
import math

import numpy as np
import pytest
import torch

from train.loop import TrainConfig, load_checkpoint, run_outputs, train
from train.models import create_model, list_models

from .conftest import IMAGE_SIZE


@pytest.mark.parametrize("name,grid", [("efficientad_lite", 8), ("efficientad_s", 8), ("efficientad_m", 8)])
def test_shapes(name, grid):
    kw = {"pretrained": False} if name == "efficientad_lite" else {"teacher": "pdn_s" if name.endswith("s") else "pdn_m"}
    m = create_model(name, image_size=IMAGE_SIZE, **kw).eval()
    frames = torch.randint(0, 256, (2, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8)
    out = m(frames)
    c = m.channels
    assert out["anomaly_map"].shape == (2, 1, IMAGE_SIZE, IMAGE_SIZE)
    assert out["raw_maps"].shape == (2, 2, grid, grid)  # student-teacher, student-autoencoder
    assert m.map_names == ("student_teacher", "student_autoencoder")
    for k in ("map_score", "gaussian_score", "image_score"):
        assert out[k].shape == (2,)
    assert out["features"].shape == (2, c)
    assert set(out) == set(m.output_names())
    assert "efficientad_lite" in list_models()


def test_stride4_student_gives_a_finer_map_and_old_configs_stay_stride8():
    from train.models.efficientad import EfficientADConfig

    m = create_model("efficientad_lite", image_size=IMAGE_SIZE, pretrained=False, student_stride=4,
                     teacher_out_indices=(1, 2, 3)).eval()
    out = m(torch.randint(0, 256, (1, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8))
    g = IMAGE_SIZE // 4
    assert out["raw_maps"].shape == (1, 2, g, g)
    assert out["anomaly_map"].shape == (1, 1, IMAGE_SIZE, IMAGE_SIZE)
    old = m.cfg.to_dict()
    old.pop("student_stride")  # checkpoints written before the option
    assert EfficientADConfig.from_dict(old).student_stride == 8
    with pytest.raises(ValueError, match="stride"):
        create_model("efficientad_lite", image_size=IMAGE_SIZE, pretrained=False, student_stride=2)
    with pytest.raises(ValueError, match="student width 0"):
        create_model("efficientad_lite", image_size=IMAGE_SIZE, pretrained=False, student_width=0)


def test_paper_sizes_at_256():
    for name in ("efficientad_s", "efficientad_m"):
        m = create_model(name)
        x = torch.zeros(1, 3, 256, 256)
        assert m.student(x).shape == (1, 768, 56, 56)
        assert m.autoencoder(x).shape == (1, 384, 56, 56)


def test_map_smoothing_is_a_normalized_gaussian():
    from train.models.efficientad import EfficientADConfig
    from train.models.head import MapSmoothing

    sm = MapSmoothing(1.0, (16, 16))
    flat = torch.full((1, 1, 16, 16), 0.3)
    assert torch.allclose(sm(flat), flat, atol=1e-6)  # constants pass: commutes with the quantile shift
    peak = torch.zeros(1, 1, 16, 16)
    peak[0, 0, 8, 8] = 1.0
    out = sm(peak)
    assert out.shape == peak.shape and abs(float(out.sum()) - 1.0) < 1e-5
    assert out[0, 0, 8, 8] == out.max() and 0.1 < float(out[0, 0, 8, 8]) < 0.2 and out[0, 0, 8, 9] > 0  # 1/(2*pi)
    assert torch.equal(MapSmoothing(0.0, (16, 16))(peak), peak)
    # checkpoints from before smoothing existed keep their maps unchanged
    assert EfficientADConfig.from_dict({"name": "efficientad_lite"}).map_blur_px == 0.0
    assert EfficientADConfig().map_blur_px > 0


def test_rescore_of_stored_network_outputs_matches_the_full_graph():
    """Calibration and the smoothing choice re-score stored raw outputs; that must equal running the graph."""
    from train.loop import raw_outputs, rescore

    m = create_model("efficientad_lite", image_size=IMAGE_SIZE, pretrained=False).eval()
    frames = np.random.default_rng(0).integers(0, 256, (5, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    raw = raw_outputs(m, frames, "cpu")
    m.head.write(map_scale=[0.5, 0.2], map_shift=[-0.1, 0.05], gaussian_mean=np.full(m.channels, 0.1),
                 gaussian_whitener=np.eye(m.channels) * 0.3, score_center=[0.2, 1.0], score_weight=[0.5, 0.7])
    m.calibrated.fill_(True)
    m.set_map_smoothing(6.0)
    keys = ("map_score", "gaussian_score", "image_score", "anomaly_map")
    again = rescore(m, raw, "cpu", batch=2, keys=keys)
    full = run_outputs(m, frames, "cpu", keys=keys)
    for k in keys:
        np.testing.assert_allclose(again[k], full[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert np.ptp(full["image_score"]) > 0  # the constants took effect, so the comparison means something


def test_cpu_bf16_autocast_step_trains(tmp_path, synthetic_root):
    """--amp on CPU: bf16 autocast with the cached teacher targets still lowers the loss."""
    cfg = TrainConfig(data=str(synthetic_root), out=str(tmp_path), image_size=IMAGE_SIZE, steps=50, seed=1,
                      save_every=0, amp=True, map_blur="auto")
    ckpt = train(cfg)
    hist = [json.loads(l) for l in open(ckpt.parent / "train_log.jsonl")]
    assert hist[-1]["loss"] < 0.9 * hist[0]["loss"], hist
    model, blob = load_checkpoint(ckpt)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast keeps fp32 master weights
    # --map-blur auto: the sigma chosen on painted validation defects is the one the checkpoint carries
    chosen = blob["map_smoothing"]
    assert chosen["how"].startswith("chosen") and len(chosen["rows"]) == 6
    assert model.cfg.map_blur_px == chosen["sigma_px_at_256"]


def test_loss_decreases_and_defects_score_higher(trained, synthetic_root):
    blob = torch.load(trained, weights_only=True)
    assert blob["format"] == "edgead-checkpoint/1"
    hist = [json.loads(l) for l in open(trained.parent / "train_log.jsonl")]
    assert len(hist) == 6 and hist[-1]["loss"] < 0.8 * hist[0]["loss"], hist
    model, _ = load_checkpoint(trained)
    assert bool(model.calibrated)
    from runtime.dataset import open_dataset
    from train.data import load_frames

    ds = open_dataset(synthetic_root)
    frames = load_frames([s.path for s in ds.test], IMAGE_SIZE)
    labels = np.array([s.label for s in ds.test])
    out = run_outputs(model, frames, "cpu", keys=("image_score", "map_score", "gaussian_score"))
    assert out["image_score"][labels == 1].mean() > out["image_score"][labels == 0].mean()
    # the graph's gated PUAD score is the one the checkpoint's score spec describes: the head's constants are
    # the spec's (score_constants), and the image score is d_map + max(d_gauss, 0) of its component scores
    from calibration.fitting import score_constants
    from runtime.artifact import ScoreSpec

    spec = ScoreSpec(**blob["score"])
    assert spec.puad_gate == 2.0
    center, weight = score_constants(spec)
    consts = model.head.constants()
    np.testing.assert_allclose(consts["score_center"], center, rtol=1e-6)
    np.testing.assert_allclose(consts["score_weight"], weight, rtol=1e-6)
    d = (np.stack([out["map_score"], out["gaussian_score"]], 1).astype(np.float64) - center) * weight
    ref = d[:, 0] + np.maximum(d[:, 1], 0.0)
    np.testing.assert_allclose(out["image_score"], ref, rtol=1e-4, atol=1e-4)
    assert (d[:, 1] < 0).any()  # the gate really cut some Gaussian scores here: the relu branch is exercised


def test_reproducible_with_seed_and_resumable(tmp_path, synthetic_root):
    def run(out, steps, resume=False):
        cfg = TrainConfig(data=str(synthetic_root), out=str(out), image_size=IMAGE_SIZE, steps=steps, seed=7,
                          save_every=5)
        return train(cfg, resume=resume)

    a = torch.load(run(tmp_path / "a", 10), weights_only=True)["state_dict"]
    b = torch.load(run(tmp_path / "b", 10), weights_only=True)["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a run split in two (stop at step 4, resume) ends bit-identical to the uninterrupted one
    cfg = TrainConfig(data=str(synthetic_root), out=str(tmp_path / "c"), image_size=IMAGE_SIZE, steps=10, seed=7,
                      save_every=0, stop_at=4)
    assert train(cfg).name == "last.pt"
    first = torch.load(tmp_path / "c" / "last.pt", weights_only=False)["train_seconds"]
    cfg.stop_at = None
    blob_c = torch.load(train(cfg, resume=True), weights_only=False)
    c = blob_c["state_dict"]
    for k in a:
        assert torch.equal(a[k], c[k]), k
    assert first > 0 and blob_c["train"]["train_seconds"] > first  # both segments counted
    assert not (tmp_path / "c" / "last.pt").exists()


def test_bad_data_is_a_clear_error(tmp_path):
    from runtime.dataset import DatasetError

    with pytest.raises(DatasetError, match="not found"):
        train(TrainConfig(data=str(tmp_path / "nope"), out=str(tmp_path / "o"), steps=1))


def test_hard_loss_is_the_mean_above_the_quantile():
    from train.models.efficientad_train import hard_loss

    g = torch.Generator().manual_seed(0)
    for n in (10, 1000, 12345):
        t, s_ = torch.rand(n, generator=g), torch.rand(n, generator=g)
        d = (t - s_) ** 2
        for q in (0.5, 0.9, 0.999):
            ref = d[d >= torch.quantile(d, q)].mean()
            assert torch.allclose(hard_loss(t, s_, q), ref), (n, q)
    t = torch.rand(4, 3, 5, 5, generator=g)
    s_ = torch.rand(4, 3, 5, 5, generator=g, requires_grad=True)
    hard_loss(t, s_, 0.9).backward()
    assert (s_.grad != 0).sum() == 300 - math.ceil(0.9 * 299)  # gradient reaches exactly the hard elements


@pytest.mark.parametrize("kw", [{"student_stride": 8}, {"student_stride": 4}, {"size": "s"}])
def test_student_halves_match_the_full_student(kw):
    """Training computes only the half of the student's output each input needs; it must be the same numbers."""
    from train.models.efficientad import head_channels

    kw = dict(kw)
    name = "efficientad_s" if kw.pop("size", None) == "s" else "efficientad_lite"
    extra = {"teacher": "pdn_s"} if name == "efficientad_s" else {"pretrained": False}
    m = create_model(name, image_size=IMAGE_SIZE, **extra, **kw).eval()
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    full = m.student(x)
    feats = m.student.trunk(x)
    c = m.channels
    torch.testing.assert_close(head_channels(m.student, feats, 0, c), full[:, :c])
    torch.testing.assert_close(head_channels(m.student, feats, c, 2 * c), full[:, c:])


def test_hard_loss_gradients_match_the_plain_form():
    from train.models.efficientad_train import hard_loss

    g = torch.Generator().manual_seed(1)
    t = torch.randn(2, 5, 6, 6, generator=g)
    s1 = torch.randn(2, 5, 6, 6, generator=g, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    d = (t - s2) ** 2
    a, b = hard_loss(t, s1, 0.95), d[d >= torch.quantile(d, 0.95)].mean()
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    torch.testing.assert_close(s1.grad, s2.grad)


def test_teacher_pool_option():
    from train.models.efficientad import EfficientADConfig

    x = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    pooled = create_model("efficientad_lite", image_size=IMAGE_SIZE, pretrained=False).eval()
    raw = create_model("efficientad_lite", image_size=IMAGE_SIZE, pretrained=False, teacher_pool=1).eval()
    raw.teacher.load_state_dict(pooled.teacher.state_dict())
    with torch.no_grad():
        a, b = pooled.teacher(x), raw.teacher(x)
    assert a.shape == b.shape
    torch.testing.assert_close(a, torch.nn.functional.avg_pool2d(b, 3, 1, 1, count_include_pad=False))
    old = pooled.cfg.to_dict()
    old.pop("teacher_pool")  # checkpoints written before the option kept the 3x3 average
    assert EfficientADConfig.from_dict(old).teacher_pool == 3
    with pytest.raises(ValueError, match="odd"):
        create_model("efficientad_lite", image_size=IMAGE_SIZE, pretrained=False, teacher_pool=2)
