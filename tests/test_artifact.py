import json

import pytest

from runtime.artifact import (STANDARD_OUTPUTS, ArtifactError, InputSpec, Sidecar, atomic_write_bytes, read_sidecar,
                              sidecar_path, write_sidecar)


def _model(tmp_path, data=b"graph-bytes"):
    p = tmp_path / "m.onnx"
    p.write_bytes(data)
    return p


def test_roundtrip_and_hash(tmp_path):
    m = _model(tmp_path)
    required = {k: STANDARD_OUTPUTS[k][1] for k in ("anomaly_map", "image_score")}
    sc = Sidecar(model_file="", model_sha256="", input=InputSpec(height=64, width=48, color_order="RGB"),
                 outputs=required, roles={k: "required" for k in required})
    sc.thresholds.image = 1.25
    write_sidecar(m, sc)
    back = read_sidecar(m)
    assert back.format == 2
    assert back.input.height == 64 and back.input.width == 48 and back.input.color_order == "RGB"
    assert back.thresholds.image == 1.25 and back.outputs == required and back.outputs_with_role("required") == list(required)
    assert back.model_file == "m.onnx" and len(back.model_sha256) == 64
    sc.outputs = {"anomaly_map": required["anomaly_map"]}  # a graph without the decision score is refused
    write_sidecar(m, sc)
    with pytest.raises(ArtifactError, match="outputs \\['image_score'\\] missing"):
        read_sidecar(m)


def test_hash_mismatch_is_refused(tmp_path):
    m = _model(tmp_path)
    write_sidecar(m, Sidecar(model_file="", model_sha256="", input=InputSpec(8, 8)))
    m.write_bytes(b"another graph")
    with pytest.raises(ArtifactError, match="does not match its sidecar"):
        read_sidecar(m)


def test_missing_and_malformed_sidecar(tmp_path):
    m = _model(tmp_path)
    with pytest.raises(ArtifactError, match="sidecar missing"):
        read_sidecar(m)
    sidecar_path(m).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_sidecar(m)
    sidecar_path(m).write_text(json.dumps({"format": 99}))
    with pytest.raises(ArtifactError, match="format 99"):
        read_sidecar(m)
    sidecar_path(m).write_text(json.dumps({"format": 1, "bogus": 1}))  # edgead 0.1's sidecar
    with pytest.raises(ArtifactError, match="sidecar format 1 .*re-export"):
        read_sidecar(m)
    sidecar_path(m).write_text(json.dumps({"format": 2, "bogus": 1}))
    with pytest.raises(ArtifactError, match="malformed sidecar"):  # (the tmp folder's name holds 'malformed')
        read_sidecar(m)
    sidecar_path(m).write_text(json.dumps({"format": 2, "model_file": "m.onnx", "model_sha256": "",
                                           "input": {"height": 8, "width": 8}, "roles": {"image_score": "maybe"}}))
    with pytest.raises(ArtifactError, match="roles must map output names"):
        read_sidecar(m)
    with pytest.raises(ArtifactError, match="model file not found"):
        read_sidecar(tmp_path / "nope.onnx")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"old")

    class Boom:
        def __len__(self):
            raise RuntimeError("boom")

    with pytest.raises(TypeError):
        atomic_write_bytes(p, Boom())  # write fails mid-way
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["f.bin"]  # no temp file left behind


@pytest.fixture()
def umask_022():
    import os

    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_write_new_file_honours_umask(tmp_path, umask_022):
    import os

    p = tmp_path / "summary.json"
    atomic_write_bytes(p, b"{}")
    assert p.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    os.umask(0o027)
    q = tmp_path / "report.json"
    atomic_write_bytes(q, b"{}")
    assert q.stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o600, 0o664])
def test_atomic_write_keeps_existing_mode(tmp_path, umask_022, mode):
    import os

    p = tmp_path / "model.onnx"
    p.write_bytes(b"old")
    os.chmod(p, mode)
    atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"new" and p.stat().st_mode & 0o777 == mode


def test_sidecar_rewrite_keeps_mode(tmp_path, umask_022):
    import os

    m = _model(tmp_path)
    write_sidecar(m, Sidecar(model_file="", model_sha256="", input=InputSpec(8, 8),
                             outputs={"anomaly_map": "map", "image_score": "score"},
                             roles={"anomaly_map": "required", "image_score": "required"}))
    assert sidecar_path(m).stat().st_mode & 0o777 == 0o644
    os.chmod(sidecar_path(m), 0o640)
    write_sidecar(m, read_sidecar(m))
    assert sidecar_path(m).stat().st_mode & 0o777 == 0o640
