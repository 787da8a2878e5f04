"""ONNX artifact -> a standard Triton Inference Server model repository.

    REPO/NAME/config.pbtxt          platform "onnxruntime_onnx" (production), "tensorrt_plan" (--engine) or backend "python"
    REPO/NAME/1/model.onnx          the artifact's graph, byte for byte (model.plan with --engine)
    REPO/NAME/1/model.onnx.json     its sidecar (thresholds, resize policy: exactly the artifact's)
    REPO/NAME/1/model.py            python variant only: the same ONNX run by ONNX Runtime inside Triton

Input and output names, dtypes and dims come from the graph, never from a model family: whatever
the export writes, Triton serves. The sidecar also travels inside ``config.pbtxt`` (parameter
``edgead_sidecar``) with the graph's digest (``edgead_model_sha256``), so a client can fetch it
from the server and check it against a local artifact (``runtime.backends.triton_backend``).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx

from runtime.artifact import ArtifactError, atomic_write_text, file_sha256, read_sidecar, write_sidecar

log = logging.getLogger(__name__)

# ONNX TensorProto element type -> Triton config data type
ONNX_TO_TRITON = {
    onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.UINT16: "TYPE_UINT16", onnx.TensorProto.INT16: "TYPE_INT16",
    onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.DOUBLE: "TYPE_FP64", onnx.TensorProto.BOOL: "TYPE_BOOL",
}
BACKENDS = ("onnxruntime", "python", "tensorrt")
MODEL_FILES = {"onnxruntime": "model.onnx", "python": "model.onnx", "tensorrt": "model.plan"}
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class TensorSpec:
    """One graph input or output: name, Triton dtype, full shape (-1 = dynamic)."""

    name: str
    dtype: str
    shape: list[int]


def graph_tensors(model_path: str | Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of the ONNX graph, initializers excluded."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}

    def spec(v) -> TensorSpec:
        t = v.type.tensor_type
        if t.elem_type not in ONNX_TO_TRITON:
            raise ArtifactError(f"{model_path}: tensor {v.name!r} has ONNX type {t.elem_type}, which Triton "
                                "configs cannot declare; re-export the model")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        return TensorSpec(v.name, ONNX_TO_TRITON[t.elem_type], dims)

    return [spec(v) for v in graph.input if v.name not in inits], [spec(v) for v in graph.output]


def _dims(values: list[int]) -> str:
    return "[ " + ", ".join(str(v) for v in values) + " ]"


def _tensor_block(t: TensorSpec, batching: bool) -> str:
    dims = t.shape[1:] if batching else t.shape
    lines = [f'    name: "{t.name}"', f"    data_type: {t.dtype}"]
    if batching and not dims:  # a per-item scalar ([N] in the graph): Triton needs dims, reshape gives [N] back
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    else:
        lines.append(f"    dims: {_dims(dims)}")
    return "  {\n" + "\n".join(lines) + "\n  }"


def _param(key: str, value: str) -> str:
    return f'parameters: {{\n  key: "{key}"\n  value: {{ string_value: {json.dumps(value, ensure_ascii=False)} }}\n}}'


def render_config(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], sidecar_json: str, sha256: str,
                  backend: str = "onnxruntime", max_batch: int = 8, instances: int = 1, kind: str | None = None,
                  queue_delay_us: int = 500) -> str:
    """config.pbtxt text. Batching is declared when every tensor's first dim is dynamic (or, for the
    python variant, always: its model.py splits a batch into the graph's fixed batch size)."""
    dynamic_first = all(t.shape and t.shape[0] == -1 for t in inputs + outputs)
    batching = max_batch > 0 and (dynamic_first or backend == "python")
    if max_batch > 0 and not batching:
        log.warning("%s: the graph has a fixed batch dimension %s; Triton cannot batch requests for it "
                    "(max_batch_size 0). Re-export with `python -m export onnx ... --batch dynamic` to let it",
                    name, inputs[0].shape[:1])
    kind = kind or ("KIND_CPU" if backend == "python" else "KIND_GPU")
    head = [f'name: "{name}"']
    head.append({"onnxruntime": 'platform: "onnxruntime_onnx"', "tensorrt": 'platform: "tensorrt_plan"',
                 "python": 'backend: "python"'}[backend])
    head.append(f"max_batch_size: {max_batch if batching else 0}")
    text = "\n".join(head) + "\n"
    text += "input [\n" + ",\n".join(_tensor_block(t, batching) for t in inputs) + "\n]\n"
    text += "output [\n" + ",\n".join(_tensor_block(t, batching) for t in outputs) + "\n]\n"
    if batching:
        text += f"dynamic_batching {{\n  max_queue_delay_microseconds: {queue_delay_us}\n}}\n"
    text += f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]\n"
    if backend != "python":
        text += f'default_model_filename: "{MODEL_FILES[backend]}"\n'
    text += _param("edgead_model_sha256", sha256) + "\n"
    text += _param("edgead_sidecar", sidecar_json) + "\n"
    return text


# The python-backend model: the same ONNX run by ONNX Runtime inside Triton (numpy + onnxruntime only).
PYTHON_MODEL = '''"""edgead python-backend model: runs model.onnx with ONNX Runtime inside Triton (written by export triton)."""
import hashlib
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        digest = _sha256(path)
        if digest != params.get("edgead_model_sha256"):
            raise pb_utils.TritonModelException(
                f"{path}: sha256 {digest[:12]} differs from config.pbtxt's edgead_model_sha256; "
                "write the repository again with `python -m export triton`")
        import onnxruntime as ort  # after the digest check: a refused model fails fast

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # the instances share the cores: K instances x (cores // K) threads. On CPU, two single-thread sessions
        # working on two requests cost ~15 % less CPU per frame than one two-thread session (no intra-op sync)
        instances = sum(int(g.get("count", 1)) for g in cfg.get("instance_group", [])) or 1
        threads = int(params.get("intra_op_threads", "0") or 0) or max(1, (os.cpu_count() or 1) // instances)
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        first = self.session.get_inputs()[0].shape[0]
        self.fixed_batch = first if isinstance(first, int) and first > 0 else None
        self.output_names = [o["name"] for o in cfg["output"]]
        # outputs declared dims [1] + reshape [] are [N] in the graph: Triton wants them [N] from here too
        self.per_item_scalar = {o["name"] for o in cfg["output"] if "reshape" in o and not o["reshape"].get("shape")}

    def _run(self, feeds):
        b = self.fixed_batch
        n = len(next(iter(feeds.values())))
        if b is None or n == b:
            return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        parts = []
        for i in range(0, n, b):
            chunk = {k: v[i:i + b] for k, v in feeds.items()}
            m = len(next(iter(chunk.values())))
            if m < b:  # pad the last chunk to the graph's fixed batch, then cut the padding off
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], b - m, 0)]) for k, v in chunk.items()}
            outs = self.session.run(self.output_names, chunk)
            parts.append([o[:m] for o in outs])
        return {k: np.concatenate([p[j] for p in parts]) for j, k in enumerate(self.output_names)}

    def execute(self, requests):
        try:
            per_request = [{k: pb_utils.get_input_tensor_by_name(r, k).as_numpy() for k in self.input_names}
                           for r in requests]
            sizes = [len(next(iter(f.values()))) for f in per_request]
            # one request (the usual case on CPU instances): its tensors as they are, no concatenation copy
            feeds = per_request[0] if len(per_request) == 1 else {
                k: np.concatenate([f[k] for f in per_request]) for k in self.input_names}
            outs = self._run(feeds)
        except Exception as e:  # answer every request with the cause instead of hanging the clients
            err = pb_utils.TritonError(f"edgead model failed: {type(e).__name__}: {e}")
            return [pb_utils.InferenceResponse(error=err) for _ in requests]
        responses, start = [], 0
        for r, n in zip(requests, sizes):
            # only the outputs this request asked for cross back into the server (a headless camera asks for
            # the scores, not the anomaly map); none named = all, as Triton defines it
            wanted = set(r.requested_output_names()) if hasattr(r, "requested_output_names") else set()
            tensors = []
            for k in self.output_names:
                if wanted and k not in wanted:
                    continue
                part = outs[k][start:start + n]
                tensors.append(pb_utils.Tensor(k, np.ascontiguousarray(part.reshape(n) if k in self.per_item_scalar
                                                                       else part)))
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += n
        return responses
'''


def write_repository(model_path: str | Path, out: str | Path, name: str | None = None, backend: str = "onnxruntime",
                     max_batch: int = 8, instances: int = 1, kind: str | None = None,
                     queue_delay_us: int = 500, engine: str | Path | None = None) -> Path:
    """Write REPO/NAME/{config.pbtxt,1/model.onnx,1/model.onnx.json[,1/model.py]}; returns REPO/NAME.

    ``engine``: a TensorRT engine built from this ONNX (``python -m export tensorrt``), served as
    ``tensorrt_plan`` (1/model.plan + its own sidecar); tensor names and dims still come from the ONNX.
    The files and sidecars are checked (digest) before anything is written; an existing REPO/NAME/1 is
    replaced only after the new files are complete.
    """
    model_path = Path(model_path)
    if model_path.suffix.lower() != ".onnx":
        raise ArtifactError(f"{model_path}: give the .onnx artifact (a TensorRT engine is built on the serving GPU: "
                            "`python -m export tensorrt` there, then put it in REPO/NAME/1/model.plan)")
    if backend not in BACKENDS:
        raise ArtifactError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if max_batch < 0 or instances < 1:
        raise ArtifactError("--max-batch must be >= 0 and --instances >= 1")
    if kind is not None and kind not in ("KIND_GPU", "KIND_CPU"):
        raise ArtifactError(f"--kind {kind!r}: choose gpu or cpu")
    sidecar = read_sidecar(model_path, verify_hash=True)
    served = model_path
    if engine is not None:
        if backend == "python":
            raise ArtifactError("--engine is served by Triton's TensorRT backend; drop --backend python")
        backend, served = "tensorrt", Path(engine)
        sidecar = read_sidecar(served, verify_hash=True)  # the engine's own sidecar (format tensorrt)
    name = name or model_path.stem
    if not NAME_RE.match(name):
        raise ArtifactError(f"--name {name!r}: use letters, digits, '_', '-' or '.' only")
    inputs, outputs = graph_tensors(model_path)
    missing = [k for k in sidecar.outputs if k not in {o.name for o in outputs}]
    if missing:
        raise ArtifactError(f"{model_path}: graph lacks outputs {missing} its sidecar promises; re-export the model")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / name
    staging = model_dir / ".1.staging"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    dst = staging / MODEL_FILES[backend]
    shutil.copyfile(served, dst)
    write_sidecar(dst, sidecar)  # model_file becomes model.onnx / model.plan; same digest
    sidecar = read_sidecar(dst)
    if backend == "python":
        atomic_write_text(staging / "model.py", PYTHON_MODEL)
    sidecar_json = json.dumps(sidecar.to_dict(), separators=(",", ":"), ensure_ascii=False)
    config = render_config(name, inputs, outputs, sidecar_json, file_sha256(dst), backend=backend,
                           max_batch=max_batch, instances=instances, kind=kind, queue_delay_us=queue_delay_us)
    version = model_dir / "1"
    if version.exists():
        old = model_dir / ".1.old"
        if old.exists():
            shutil.rmtree(old)
        version.rename(old)
        staging.rename(version)
        shutil.rmtree(old)
    else:
        staging.rename(version)
    atomic_write_text(model_dir / "config.pbtxt", config)
    log.info("wrote Triton model %s (%s, max_batch_size from config) in %s", name, backend, out)
    return model_dir
