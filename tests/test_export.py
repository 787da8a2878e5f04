"""ONNX export: parity with PyTorch, fp16, dynamic batch, named constants, Q/DQ INT8, clear errors."""
import numpy as np
import onnx
import pytest
import torch

from calibration.metrics import auroc
from export.onnx_export import ExportError, calibration_constants, export_onnx
from runtime.artifact import ArtifactError, read_sidecar
from runtime.dataset import open_dataset
from runtime.model import Model
from train.data import load_frames
from train.loop import load_checkpoint, run_outputs

from .conftest import IMAGE_SIZE


@pytest.fixture(scope="module")
def test_frames(synthetic_root):
    ds = open_dataset(synthetic_root)
    return load_frames([s.path for s in ds.test], IMAGE_SIZE), np.array([s.label for s in ds.test])


KEYS = ("anomaly_map", "map_score", "gaussian_score", "image_score", "features", "raw_maps")


def _torch_out(ckpt, frames):
    model, _ = load_checkpoint(ckpt)
    return run_outputs(model, frames, "cpu", keys=KEYS)


def _onnx_out(path, frames):
    m = Model(path, warmup=0)
    return m.infer(frames)


def test_fp32_parity_and_auroc(trained, onnx_model, test_frames):
    frames, labels = test_frames
    ref = _torch_out(trained, frames)
    out = _onnx_out(onnx_model, frames)
    for k in KEYS:
        assert np.abs(out[k] - ref[k]).max() <= 1e-4 * max(1.0, np.abs(ref[k]).max()), k
    assert round(auroc(labels, out["image_score"]), 3) == round(auroc(labels, ref["image_score"]), 3)


def test_graph_carries_named_constants_and_sidecar(onnx_model, trained):
    g = onnx.load(str(onnx_model))
    sc = read_sidecar(onnx_model)
    model, blob = load_checkpoint(trained)
    assert sc.calibration_initializers == list(model.head.calibration_names)
    consts = calibration_constants(g, sc.calibration_initializers)
    assert set(consts) == {"map_scale", "map_shift", "gaussian_mean", "gaussian_whitener", "score_center", "score_weight"}
    for name, value in model.head.constants().items():  # every constant the graph carries is the checkpoint's
        assert consts[name].shape == value.shape, name
        np.testing.assert_allclose(consts[name], value, rtol=1e-6, err_msg=name)
    assert g.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert sc.input.layout == "NHWC" and sc.input.color_order == "BGR" and sc.input.height == IMAGE_SIZE
    assert sc.normalization.map_names == ["student_teacher", "student_autoencoder"]
    assert sc.normalization.q_high == pytest.approx(blob["normalization"]["q_high"])
    assert sc.thresholds.image == pytest.approx(blob["thresholds"]["image"])
    assert sc.gaussian.dim == model.channels


def test_fp16_and_dynamic_batch(tmp_path, trained, test_frames):
    frames, labels = test_frames
    ref = _torch_out(trained, frames)
    p = export_onnx(trained, tmp_path / "m16.onnx", fp16=True, batch="dynamic")
    m = Model(p, warmup=0)
    assert m.fixed_batch is None
    out = m.infer(frames)  # whole test set as one dynamic batch
    assert out["anomaly_map"].shape[0] == len(frames)
    assert np.abs(out["anomaly_map"] - ref["anomaly_map"]).max() <= 1e-2
    assert np.abs(out["map_score"] - ref["map_score"]).max() <= 1e-2
    # Mahalanobis amplifies fp16 feature noise through the whitener: compare relative to the score scale
    rel = np.abs(out["image_score"] - ref["image_score"]).max() / np.abs(ref["image_score"]).max()
    assert rel <= 1e-2
    assert abs(auroc(labels, out["image_score"]) - auroc(labels, ref["image_score"])) <= 0.01


def test_fixed_batch_model_splits_and_pads(onnx_model, test_frames):
    frames, _ = test_frames
    m = Model(onnx_model, warmup=0)
    assert m.fixed_batch == 1
    out = m.infer(frames[:3])
    assert out["image_score"].shape == (3,)


@pytest.mark.parametrize("target", ["cpu", "tensorrt"])
def test_int8_qdq_runs_in_onnxruntime(tmp_path, trained, synthetic_root, test_frames, target):
    from onnx import numpy_helper

    from calibration.field import calibrate
    from export.quantize import quantize_qdq

    frames, labels = test_frames
    fp32 = export_onnx(trained, tmp_path / "f.onnx")
    q = quantize_qdq(fp32, tmp_path / "q.onnx", synthetic_root / "train" / "good", target=target)
    g = onnx.load(str(q))
    qnodes = [n for n in g.graph.node if n.op_type == "QuantizeLinear"]
    assert len(qnodes) >= 5
    inits = {i.name: numpy_helper.to_array(i) for i in g.graph.initializer}
    zero_points = [inits[n.input[2]] for n in qnodes if len(n.input) > 2 and n.input[2] in inits]
    assert zero_points
    if target == "tensorrt":  # TensorRT accepts symmetric int8 only: zero point 0
        assert all(z.dtype == np.int8 and not z.any() for z in zero_points)
    else:  # ONNX Runtime's fast x86 path: uint8 activations; TensorRT would reject it, and says so before building
        assert all(z.dtype == np.uint8 for z in zero_points)
        from export.tensorrt_build import build_engine

        with pytest.raises(ArtifactError, match="int8-target tensorrt"):
            build_engine(q, tmp_path / "q.engine", int8=True)
    dq_outputs = {n.output[0] for n in g.graph.node if n.op_type == "DequantizeLinear"}
    teacher_convs = [n for n in g.graph.node if n.op_type == "Conv" and "/teacher/" in n.name]
    assert teacher_convs and not any(n.input[1] in dq_outputs for n in teacher_convs)  # teacher stays fp32
    smoothing = [n for n in g.graph.node if n.op_type == "Conv" and "/head/smoothing/" in n.name]
    assert smoothing and not any(i in dq_outputs for n in smoothing for i in n.input)  # final map stays fp32
    networks = [n for n in g.graph.node if n.op_type == "Conv" and ("/student/" in n.name or "/autoencoder/" in n.name)]
    # the rest is int8, sub-modules that happen to be named 'head' (the autoencoder's) included
    assert networks and all(n.input[1] in dq_outputs for n in networks), [n.name for n in networks
                                                                          if n.input[1] not in dq_outputs]
    assert read_sidecar(q).provenance["int8"]["target"] == target
    calibrate(q, str(synthetic_root / "train" / "good"))  # constants refit on the quantized graph
    calibrate(fp32, str(synthetic_root / "train" / "good"))  # same procedure on fp32, for a like-for-like comparison
    a, b = Model(fp32, warmup=0).infer(frames), Model(q, warmup=0).infer(frames)
    # stated tolerance (README): normalized maps max |diff| <= 0.1 (= q_b of good images), mean |diff| <= 0.01,
    # image AUROC within 0.1 on this 40-image, 64 px smoke set (observed here: 0.07; INT8 accuracy on real data is
    # a benchmark matter, see README)
    d = np.abs(a["anomaly_map"] - b["anomaly_map"])
    # the symmetric TensorRT recipe (int8 activations, run here in ONNX Runtime) now quantizes the autoencoder's own
    # head convolutions too (they were wrongly left fp32 by a name match for a while): mean |diff| measured 0.027 on
    # this smoke model, so its bound is 0.03; the CPU recipe keeps 0.01
    mean_bound = 0.03 if target == "tensorrt" else 0.01
    assert d.max() <= 0.1 and d.mean() <= mean_bound, (d.max(), d.mean())
    assert abs(auroc(labels, a["image_score"]) - auroc(labels, b["image_score"])) <= 0.1


def test_clear_errors(tmp_path, trained):
    with pytest.raises(ArtifactError, match="not found"):
        export_onnx(tmp_path / "none.pt", tmp_path / "m.onnx")
    bogus = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, bogus)
    with pytest.raises(ArtifactError, match="not an edgead checkpoint"):
        export_onnx(bogus, tmp_path / "m.onnx")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="not a readable"):
        export_onnx(junk, tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="does not exist"):
        export_onnx(trained, tmp_path / "missing" / "m.onnx")
    with pytest.raises(ExportError, match="opset 9"):
        export_onnx(trained, tmp_path / "m.onnx", opset=9)


def test_uncalibrated_checkpoint_is_refused(tmp_path):
    from train.loop import save_checkpoint
    from train.models import create_model

    m = create_model("efficientad_lite", image_size=IMAGE_SIZE, pretrained=False)
    p = tmp_path / "raw.pt"
    save_checkpoint(p, m, {})
    with pytest.raises(ExportError, match="no map quantiles"):
        export_onnx(p, tmp_path / "m.onnx")


def test_torch_program_backend_matches_onnx(tmp_path, trained, onnx_model, test_frames):
    from export.onnx_export import export_torch_program

    frames, _ = test_frames
    pt2 = export_torch_program(trained, tmp_path / "m.pt2", batch=4)
    m = Model(pt2, device="cpu", warmup=0)
    assert m.provider.startswith("torch:cpu")
    a = m.infer(frames[:4])
    b = Model(onnx_model, warmup=0).infer(frames[:4])
    for k in KEYS:
        assert np.abs(a[k] - b[k]).max() <= 1e-4 * max(1.0, np.abs(b[k]).max()), k


def test_onnxruntime_workers_do_not_spin_by_default(onnx_model, monkeypatch):
    """Spinning ORT workers steal the cores a stream's decode thread (and a benchmark's other side) needs."""
    monkeypatch.delenv("EDGEAD_ORT_SPIN", raising=False)
    opts = Model(onnx_model, warmup=0).backend.session.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    monkeypatch.setenv("EDGEAD_ORT_SPIN", "1")
    opts = Model(onnx_model, warmup=0).backend.session.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "1"


def test_stride4_model_exports_with_parity(tmp_path, synthetic_root, test_frames):
    """The fine (stride-4) student's upsample-and-fuse path survives export unchanged."""
    from train.loop import TrainConfig, train

    cfg = TrainConfig(data=str(synthetic_root), out=str(tmp_path / "run"), image_size=IMAGE_SIZE, steps=3, seed=0,
                      save_every=0, model_kwargs={"student_stride": 4, "teacher_out_indices": (1, 2, 3)})
    ckpt = train(cfg)
    frames, _ = test_frames
    ref = _torch_out(ckpt, frames[:4])
    out = _onnx_out(export_onnx(ckpt, tmp_path / "m.onnx"), frames[:4])
    assert out["anomaly_map"].shape == ref["anomaly_map"].shape
    for k in KEYS:
        assert np.abs(out[k] - ref[k]).max() <= 1e-4 * max(1.0, np.abs(ref[k]).max()), k


def test_int8_export_cli_leaves_the_model_its_sidecar_and_the_fp32_source_only(tmp_path, trained, synthetic_root):
    """`python -m export onnx --int8` refits the constants of the graph it just wrote: no .bak litter."""
    from export.cli import main

    out = tmp_path / "m" / "model.onnx"
    out.parent.mkdir()
    assert main(["onnx", str(trained), "--out", str(out), "--int8", "--calib-images",
                 str(synthetic_root / "train" / "good")]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "model.fp32.onnx", "model.fp32.onnx.json", "model.onnx", "model.onnx.json"]
    assert read_sidecar(out).provenance["calibration"]["source"] == str(synthetic_root / "train" / "good")
    assert Model(out, warmup=0).infer(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8))["image_score"].shape == (1,)
