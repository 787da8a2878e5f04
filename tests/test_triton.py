"""Triton serving: the exported repository, and the real tritonserver (nvidia-pytriton 0.7.0 wheel) on loopback.

The server tests run the repository's python-backend variant (the wheel has no ONNX Runtime backend);
the onnxruntime_onnx config is checked against the graph by parsing it with Triton's own protobuf schema.
"""
from __future__ import annotations

import io
import json
import logging
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.artifact import ArtifactError, InputSpec, Sidecar, file_sha256, read_sidecar, write_sidecar
from runtime.sources import Source

pytest.importorskip("tritonclient.grpc", reason="tritonclient not installed: pip install edgead[triton]")
pytest.importorskip("tritonclient.http", reason="tritonclient not installed: pip install edgead[triton]")

NAME = "edgead_py"


# -- helpers ---------------------------------------------------------------------------------------------------
def toy_artifact(path: Path, size: int = 8) -> Path:
    """A family-free graph: uint8 frames [N,s,s,3] -> anomaly_map [N,1,H,W] (H, W left symbolic, as exporters
    sometimes leave them), image_score [N], extra [N]."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["frames"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["f"], ["m"], axes=[3], keepdims=1),
             helper.make_node("Transpose", ["m"], ["anomaly_map"], perm=[0, 3, 1, 2]),
             helper.make_node("ReduceMax", ["m"], ["image_score"], axes=[1, 2, 3], keepdims=0),
             helper.make_node("ReduceMin", ["m"], ["extra"], axes=[1, 2, 3], keepdims=0)]
    graph = helper.make_graph(
        nodes, "toy", [helper.make_tensor_value_info("frames", TensorProto.UINT8, ["N", size, size, 3])],
        [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["N", 1, "H", "W"]),
         helper.make_tensor_value_info("image_score", TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info("extra", TensorProto.FLOAT, ["N"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    sc = Sidecar(model_file=path.name, model_sha256="", input=InputSpec(height=size, width=size, batch="dynamic"),
                 outputs={"anomaly_map": "mean over channels", "image_score": "max of the map", "extra": "min"})
    sc.thresholds.image = 100.0
    write_sidecar(path, sc)
    return path


class ListSource(Source):
    """Given frames, optionally paced (seconds between frames); a file-like source (every frame matters)."""

    def __init__(self, frames: list[np.ndarray], period: float = 0.0, live: bool = False):
        self._frames, self.period, self.live, self.name = frames, period, live, "list"

    def frames(self):
        for f in self._frames:
            if self.period:
                time.sleep(self.period)
            yield f


def frames_of(root: Path, n: int, offset: int = 0) -> list[np.ndarray]:
    """n distinct BGR frames from the synthetic dataset (good and defective parts, varied sizes)."""
    from runtime.dataset import read_image

    files = sorted(p for p in root.rglob("*.png") if "ground_truth" not in p.parts)
    out = []
    for i in range(n):
        img = read_image(files[(offset + i) % len(files)])
        out.append(np.ascontiguousarray(np.roll(img, 7 * (offset + i), axis=1)))  # distinct even when files repeat
    return out


def records(sink: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in sink.getvalue().splitlines()]


# -- fixtures --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def triton_dist():
    from runtime.triton_local import TritonUnavailable, backend_dir, server_dist, stub_env

    try:
        dist = server_dist()
        backend_dir(dist)
        stub_env(dist.parent)
    except TritonUnavailable as e:
        pytest.skip(f"real tritonserver unavailable here: {e}")
    return dist


@pytest.fixture(scope="module")
def served_repo(tmp_path_factory, onnx_model) -> Path:
    from export.triton_repo import write_repository

    repo = tmp_path_factory.mktemp("triton") / "repo"
    write_repository(onnx_model, repo, name=NAME, backend="python", max_batch=8)
    # a model the server must refuse to load: its graph no longer matches the digest in its config
    write_repository(onnx_model, repo, name="tampered", backend="python")
    with open(repo / "tampered" / "1" / "model.onnx", "ab") as f:
        f.write(b"\0")
    # a family-free graph, served as it is, and once with a sidecar that promises another input size
    toy = toy_artifact(tmp_path_factory.mktemp("toy") / "toy.onnx")
    write_repository(toy, repo, name="toy", backend="python")
    cfg = write_repository(toy, repo, name="toy_mismatch", backend="python") / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace('\\"height\\":8', '\\"height\\":16'))
    assert '\\"height\\":16' in cfg.read_text()
    return repo


@pytest.fixture(scope="module")
def server(triton_dist, served_repo, tmp_path_factory):
    from runtime.triton_local import LocalTriton

    srv = LocalTriton(served_repo, tmp_path_factory.mktemp("log") / "server.log", dist=triton_dist,
                      models=[NAME, "toy", "toy_mismatch"],
                      extra_args=["--exit-on-error", "false", "--strict-readiness", "false"])
    srv.start().wait_ready(90)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def local(onnx_model):
    from runtime.model import Model

    return Model(onnx_model)


# -- the repository --------------------------------------------------------------------------------------------
def _parse(config_path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())


def test_onnxruntime_config_matches_graph(tmp_path):
    """Dynamic-batch graph: names, dtypes, dims from the graph, batching, instances, sidecar and digest."""
    from export.triton_repo import write_repository
    from tritonclient.grpc import model_config_pb2 as pb

    art = toy_artifact(tmp_path / "toy.onnx")
    model_dir = write_repository(art, tmp_path / "repo", name="toy", max_batch=16, instances=2)
    cfg = _parse(model_dir / "config.pbtxt")
    assert cfg.name == "toy" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
    assert [(t.name, t.data_type, list(t.dims)) for t in cfg.input] == [("frames", pb.TYPE_UINT8, [8, 8, 3])]
    outs = {t.name: (t.data_type, list(t.dims), t.HasField("reshape"), list(t.reshape.shape)) for t in cfg.output}
    assert outs == {"anomaly_map": (pb.TYPE_FP32, [1, -1, -1], False, []),
                    "image_score": (pb.TYPE_FP32, [1], True, []), "extra": (pb.TYPE_FP32, [1], True, [])}
    assert cfg.HasField("dynamic_batching")
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(2, pb.ModelInstanceGroup.KIND_GPU)]
    served = model_dir / "1" / "model.onnx"
    assert served.read_bytes() == art.read_bytes()
    sha = cfg.parameters["edgead_model_sha256"].string_value
    assert sha == file_sha256(art) == read_sidecar(served).model_sha256
    sc = json.loads(cfg.parameters["edgead_sidecar"].string_value)
    assert sc == read_sidecar(served).to_dict() and sc["thresholds"]["image"] == 100.0


def test_engine_config_is_tensorrt_plan(tmp_path):
    """With --engine: platform tensorrt_plan, 1/model.plan + the engine's sidecar, tensors from the ONNX.
    (The engine's bytes are opaque to the writer; no TensorRT here to build a real one.)"""
    from export.triton_repo import write_repository

    art = toy_artifact(tmp_path / "toy.onnx")
    engine = tmp_path / "toy.engine"
    engine.write_bytes(b"engine bytes built by TensorRT on the serving GPU")
    sc = read_sidecar(art)
    sc.backend_format = "tensorrt"
    write_sidecar(engine, sc)
    cfg = _parse(write_repository(art, tmp_path / "repo", name="toy_trt", engine=engine) / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan" and cfg.default_model_filename == "model.plan"
    assert cfg.max_batch_size == 8 and [t.name for t in cfg.input] == ["frames"]
    plan = tmp_path / "repo" / "toy_trt" / "1" / "model.plan"
    assert plan.read_bytes() == engine.read_bytes() and not (plan.parent / "model.onnx").exists()
    assert cfg.parameters["edgead_model_sha256"].string_value == file_sha256(engine) == read_sidecar(plan).model_sha256
    assert json.loads(cfg.parameters["edgead_sidecar"].string_value)["backend_format"] == "tensorrt"


def test_fixed_batch_graph_gets_no_batching_on_onnxruntime(tmp_path, onnx_model):
    """A batch-1 export cannot be batched by Triton's ORT backend: max_batch_size 0, full dims; python variant batches."""
    from export.triton_repo import graph_tensors, write_repository

    inputs, outputs = graph_tensors(onnx_model)
    assert inputs[0].shape[0] == 1
    cfg = _parse(write_repository(onnx_model, tmp_path / "r", name="fixed") / "config.pbtxt")
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert list(cfg.input[0].dims) == inputs[0].shape
    assert {t.name: list(t.dims) for t in cfg.output} == {t.name: t.shape for t in outputs}
    py = _parse(write_repository(onnx_model, tmp_path / "r", name="fixed_py", backend="python") / "config.pbtxt")
    assert py.backend == "python" and py.max_batch_size == 8 and py.HasField("dynamic_batching")
    assert (tmp_path / "r" / "fixed_py" / "1" / "model.py").is_file()


def test_export_cli_triton_and_errors(tmp_path, capsys):
    from export.cli import main

    art = toy_artifact(tmp_path / "toy.onnx")
    assert main(["triton", str(art), "--out", str(tmp_path / "repo"), "--name", "line3", "--backend", "python"]) == 0
    assert (tmp_path / "repo" / "line3" / "config.pbtxt").is_file()
    assert main(["triton", str(art), "--out", str(tmp_path / "repo"), "--name", "bad name"]) == 2
    assert "--name 'bad name'" in capsys.readouterr().err
    (tmp_path / "toy.onnx").write_bytes(b"changed")
    assert main(["triton", str(art), "--out", str(tmp_path / "repo")]) == 2
    assert "does not match its sidecar" in capsys.readouterr().err


# -- the real server -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("proto", ["grpc", "http"])
def test_served_scores_equal_local(server, local, synthetic_root, proto):
    from runtime.model import Model

    remote = Model(None, server=server.grpc_url if proto == "grpc" else server.http_url, model_name=NAME)
    assert remote.provider.startswith(f"triton:{proto}://")
    frames = frames_of(synthetic_root, 6)
    prepared = remote.prepare(frames)
    got = remote.backend.infer(prepared)  # one request of 6: the server's model splits it into its graph's batch
    want = local.infer(prepared)
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert np.abs(got[k] - want[k]).max() <= 1e-5, k
    only = remote.infer(prepared, outputs=["image_score"])  # what a headless stream asks for
    assert list(only) == ["image_score"] and np.abs(only["image_score"] - want["image_score"]).max() <= 1e-5
    a, b = remote.predict(frames), local.predict(frames)
    assert np.abs(a.image_score - b.image_score).max() <= 1e-5
    assert (a.is_ng == b.is_ng).all() and remote.threshold == local.threshold
    remote.close()


def test_any_graph_is_served(server, served_repo):
    """Nothing in the path names a model family: a toy graph's outputs come back as the graph makes them."""
    import onnxruntime as ort

    from runtime.backends.triton_backend import TritonBackend

    backend = TritonBackend(server.grpc_url, "toy")
    x = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    got = backend.infer(x)
    sess = ort.InferenceSession(str(served_repo / "toy" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"frames": x})))
    assert set(got) == {"anomaly_map", "image_score", "extra"}
    for k in want:
        assert got[k].shape == want[k].shape and np.abs(got[k] - want[k]).max() <= 1e-5, k
    assert backend.sidecar.outputs["extra"] == "min"
    backend.close()


def _client(url: str, frames: list[np.ndarray], period: float = 0.0, policy: str = "block", live: bool = False):
    from runtime.model import Model
    from runtime.stream import Stream

    sink = io.StringIO()
    stream = Stream(Model(None, server=url, model_name=NAME), ListSource(frames, period, live), policy=policy,
                    sink=sink, reconnect_delay=0.1, max_reconnects=30, reconnect_max_delay=0.5)
    return stream, sink


def _run_all(streams) -> list:
    out = [None] * len(streams)
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, streams[i].run())) for i in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def _check_client(rec: list[dict], frames: list[np.ndarray], local) -> None:
    assert [r["frame_id"] for r in rec] == list(range(len(frames)))  # none lost, none duplicated, in order
    want = local.predict(frames).image_score
    got = np.array([r["score"] for r in rec])
    assert np.abs(got - want).max() <= 2e-6  # JSONL rounds to 6 decimals; a frame of another client would differ


def test_four_concurrent_clients(server, local, synthetic_root):
    n = 20
    per_client = [frames_of(synthetic_root, n, offset=100 * c) for c in range(4)]
    clients = [_client(server.grpc_url if c % 2 == 0 else server.http_url, per_client[c]) for c in range(4)]
    summaries = _run_all([s for s, _ in clients])
    for (stream, sink), frames, summary in zip(clients, per_client, summaries):
        assert summary.error is None and summary.frames_scored == n and summary.frames_dropped == 0
        _check_client(records(sink), frames, local)


def test_clear_errors(server, served_repo, tmp_path, capsys, synthetic_root):
    from runtime.backends.base import BackendUnavailable
    from runtime.model import Model
    from runtime.stream import main
    from runtime.triton_local import free_port

    (tmp_path / "imgs").mkdir()
    shutil.copy(next(synthetic_root.rglob("*.png")), tmp_path / "imgs" / "a.png")
    rc = main(["--images", str(tmp_path / "imgs"), "--server", server.grpc_url, "--model-name", "nope", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "error: model 'nope' is not in the repository" in err[-1] and "--model-name" in err[-1]
    with pytest.raises(ArtifactError, match="not ready .*UNAVAILABLE.*sha256"):
        Model(None, server=server.grpc_url, model_name="tampered")
    with pytest.raises(ArtifactError, match=r"input 'frames' is UINT8 \[-1, 8, 8, 3\], the sidecar expects UINT8 "
                       r"\[N,16,8,3\]"):
        Model(None, server=server.grpc_url, model_name="toy_mismatch")
    other = toy_artifact(tmp_path / "other.onnx")
    with pytest.raises(ArtifactError, match="differs from the model 'edgead_py'"):
        Model(other, server=server.http_url, model_name=NAME)
    with pytest.raises(BackendUnavailable, match="cannot reach Triton"):
        Model(None, server=f"grpc://127.0.0.1:{free_port()}", model_name=NAME)
    assert main(["--images", str(tmp_path / "imgs"), "--server", server.grpc_url, "-q"]) == 2
    assert "--model-name" in capsys.readouterr().err


def test_server_killed_and_restarted_midstream(server, local, synthetic_root, caplog):
    """SIGKILL mid-stream, restart on the same ports: clients report, reconnect and score every frame once."""
    caplog.set_level(logging.WARNING)
    n = 30
    per_client = [frames_of(synthetic_root, n, offset=300 + 50 * c) for c in range(2)]
    clients = [_client(url, f, period=0.03) for url, f in zip((server.grpc_url, server.http_url), per_client)]
    live_frames = frames_of(synthetic_root, n, offset=500)
    live, live_sink = _client(server.grpc_url, live_frames, period=0.03, policy="latest", live=True)
    done: list = []
    runner = threading.Thread(target=lambda: done.extend(_run_all([s for s, _ in clients] + [live])))
    runner.start()
    t_end = time.monotonic() + 30
    while len(records(clients[0][1])) < 8 and time.monotonic() < t_end:
        time.sleep(0.02)
    server.kill()
    time.sleep(0.5)
    server.models = [NAME]  # the last test of the module: bring back only the model the clients use
    server.extra_args += ["--model-control-mode", "explicit", "--load-model", NAME]
    server.start().wait_ready(90)
    runner.join(120)
    *summaries, live_summary = done
    for (stream, sink), frames, summary in zip(clients, per_client, summaries):
        assert summary.error is None and summary.frames_scored == n and summary.frames_dropped == 0
        assert summary.server_reconnects >= 1
        _check_client(records(sink), frames, local)
    # live policy: frames that met the dead server are counted as dropped, never silently lost
    assert live_summary.error is None and live_summary.server_reconnects >= 1
    assert live_summary.frames_scored + live_summary.frames_dropped == live_summary.frames_captured == n
    assert live_summary.frames_dropped >= 1
    ids = [r["frame_id"] for r in records(live_sink)]
    assert ids == sorted(set(ids))
    assert any("reconnecting" in r.getMessage() for r in caplog.records)
