"""The model-family contract, for every registered family and a toy family defined only in tests/.

Each family: a tiny model trains a few steps on generated parts -> exports to ONNX -> loads in the
torch-free runtime -> calibrates (torch-free) -> streams. Outputs, shapes, roles, the sidecar round
trip (and its JSON Schema), refusals, and that calibration's scores are the deployed graph's.
"""
from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

import tests.toy_family  # noqa: F401  (registers the toy family: no edit outside its own file)
from runtime.artifact import SCHEMA_FILE, ArtifactError, read_sidecar, sidecar_path
from runtime.dataset import list_images, read_image

# one small, fast configuration per registered family (the toy one twice: with and without a Gaussian)
FAMILY_CASES = {
    "efficientad_lite": dict(steps=3, pretrained=False),
    "uniad": dict(steps=3, pretrained=False, batch_size=2,
                  model_kwargs=dict(feature_stride=8, hidden=16, heads=2, encoder_layers=1, decoder_layers=1, ff=32)),
    "generalad_lite": dict(steps=3, batch_size=2, pretrained=False, model_kwargs={"hidden": 16, "heads": 2}),
    "toy_mean_patch": dict(steps=1),
    "crossclass_lite": dict(steps=3, pretrained=False,
                            model_kwargs=dict(dim=32, heads=2, ff=64, layers=1, prototypes=16, episode_batch=4)),
    # small memories: the plumbing of the contract; the memory bank's own accuracy/size trade-off is benchmarked
    "patchcore_lite": dict(steps=1, model_kwargs={"memory_size": 256}),
    "patchcore_lite0": dict(steps=1, model_kwargs={"memory_size": 256}),
    "toy_mean_patch_nogauss": dict(model="toy_mean_patch", steps=1, model_kwargs={"with_gaussian": False}),
}


def _registered_cases() -> list[str]:
    from train.models import list_models

    # other sizes of a family whose lite model is a case: efficientad_s/m (paper-size networks), generalad_lite_fine
    # (generalad_lite with another input size and graded range: the same graph)
    variants = ("efficientad_s", "efficientad_m", "generalad_lite_fine")
    cases = [name for name in list_models() if name not in variants]
    cases += [c for c in FAMILY_CASES if c not in cases]
    return cases


@pytest.fixture(scope="module", params=_registered_cases())
def artifact(request, tmp_path_factory, synthetic_root):
    logging.getLogger("train").setLevel(logging.WARNING)
    from export.onnx_export import export_onnx
    from train.loop import TrainConfig, train

    case = dict(FAMILY_CASES.get(request.param, {"steps": 2}))
    model_name = case.pop("model", request.param)
    out = tmp_path_factory.mktemp(request.param)
    cfg = TrainConfig(data=str(synthetic_root), out=str(out / "run"), model=model_name, image_size=64, seed=0,
                      save_every=0, **case)
    ckpt = train(cfg)
    return request.param, ckpt, export_onnx(ckpt, out / "model.onnx")


def _good_frames(root: Path, n: int = 40) -> list[np.ndarray]:
    return [read_image(p) for p in list_images(root / "train" / "good")[:n]]


def test_outputs_roles_and_shapes(artifact, synthetic_root):
    from runtime.model import Model

    _, _, path = artifact
    sc = read_sidecar(path)
    assert sc.family and sc.roles["anomaly_map"] == "required" and sc.roles["image_score"] == "required"
    assert set(sc.outputs) == set(sc.roles)
    model = Model(path)
    assert set(model.backend.output_names) == set(sc.outputs)
    pred = model.predict(_good_frames(synthetic_root, 3))
    assert pred.image_score.shape == (3,) and pred.anomaly_map.shape == (3, sc.input.height, sc.input.width)
    assert set(pred.scores) == set(sc.outputs_with_role("component")) and "map_score" in pred.scores
    assert pred.raw["raw_maps"].shape[:2] == (3, len(sc.head["map_names"]))
    assert ("gaussian_score" in pred.scores) == sc.head["has_gaussian"]


def test_export_matches_the_torch_model(artifact, synthetic_root):
    from runtime.model import Model
    from train.loop import load_checkpoint, run_outputs

    _, ckpt, path = artifact
    torch_model, _ = load_checkpoint(ckpt)
    model = Model(path)
    frames = model.prepare(_good_frames(synthetic_root, 4))
    scores = tuple(k for k in ("map_score", "gaussian_score") if k in torch_model.output_names())
    ref = run_outputs(torch_model, frames, "cpu", keys=("image_score", "anomaly_map") + scores)
    out = model.infer(frames)
    tol = 1e-4  # every family, the memory bank included (its distance is recomputed exactly from the nearest item)
    for k in ("anomaly_map",) + scores:  # the scores the image score is made of, each at 1e-4
        np.testing.assert_allclose(out[k], ref[k], rtol=tol, atol=tol, err_msg=k)
    # image_score = sum((score - centre) * weight): the head multiplies the engines' float32 rounding of the
    # scores by the calibration's weight (1 / the good images' score spread, 23 for a 3-step test model), so the
    # image score is compared in the scores' own units: its difference divided by the largest weight
    gain = max(1.0, float(torch_model.head.score_weight.abs().max()))
    np.testing.assert_allclose(out["image_score"] / gain, ref["image_score"] / gain, rtol=tol, atol=tol)


def test_sidecar_round_trip_and_schema(artifact):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the dev extra")
    _, _, path = artifact
    raw = json.loads(sidecar_path(path).read_text())
    jsonschema.validate(raw, json.loads(SCHEMA_FILE.read_text()))
    sc = read_sidecar(path)
    assert sc.to_dict() == raw
    for bad in ({**raw, "format": 1}, {**raw, "format": 99}, {**raw, "roles": {**raw["roles"], "x": "weird"}},
                {**raw, "input": "64x64"}):
        with pytest.raises(ArtifactError):
            type(sc).from_dict(bad)


def test_calibrate_then_stream(artifact, synthetic_root, tmp_path):
    """Field calibration (torch-free) sets its threshold on the scores the deployed graph produces."""
    from calibration.field import calibrate
    from runtime.model import Model
    from runtime.sources import FolderSource
    from runtime.stream import Stream

    name, _, path = artifact
    dst = tmp_path / "model.onnx"
    shutil.copy2(path, dst)
    shutil.copy2(sidecar_path(path), sidecar_path(dst))
    good_dir = synthetic_root / "train" / "good"
    res = calibrate(dst, str(good_dir))
    model = Model(dst)
    pred = model.predict(_good_frames(synthetic_root, 10 ** 6))
    np.testing.assert_allclose(pred.image_score, res.good_scores, rtol=1e-4, atol=1e-5)
    assert float((pred.image_score >= model.threshold).mean()) == pytest.approx(res.thresholds.fit_fpr)
    sink = io.StringIO()
    summary = Stream(model, FolderSource(synthetic_root / "test" / "good"), sink=sink).run()
    recs = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert summary.frames_scored == len(recs) > 0 and summary.error is None
    assert set(recs[0]["scores"]) == set(model.sidecar.outputs_with_role("component"))


def test_runtime_names_no_family():
    root = Path(__file__).resolve().parents[1]
    from train.models import list_families

    files = [root / "runtime" / f for f in ("model.py", "stream.py", "bench.py")]
    files += list((root / "runtime" / "backends").glob("*.py")) + list((root / "calibration").glob("*.py"))
    for fam in list_families() + ["patchcore", "uniad", "generalad"]:
        for f in files:
            text = f.read_text().lower()
            assert fam not in text, f"{f.relative_to(root)} names the family {fam!r}"
