"""Build a serialized TensorRT engine from an exported ONNX graph (TensorRT 10/11 Python API).

- fp16: ``BuilderFlag.FP16``; int8: the ONNX must carry Q/DQ nodes (``export.quantize``),
  i.e. explicit quantization, and is built with ``BuilderFlag.INT8`` as well;
- the calibration constants are marked refittable (``BuilderFlag.REFIT_INDIVIDUAL`` +
  ``mark_weights_refittable``), so ``python -m calibration fit`` refits instead of rebuilding;
- a dynamic-batch ONNX gets one optimization profile (min 1, opt and max = --max-batch).

TensorRT cannot be installed on this project's development and CI machines: this module
has not been run there. It is written against the documented API and isolated here.
"""
from __future__ import annotations

import logging
from pathlib import Path

from runtime.artifact import ArtifactError, atomic_write_bytes, read_sidecar, write_sidecar
from runtime.backends.base import BackendUnavailable

log = logging.getLogger(__name__)


def build_engine(onnx_path: str | Path, out: str | Path, fp16: bool = False, int8: bool = False,
                 workspace_gb: float = 4.0, max_batch: int = 32) -> Path:
    onnx_path, out = Path(onnx_path), Path(out)
    sc = read_sidecar(onnx_path)
    if int8 and sc.precision != "int8-qdq":
        raise ArtifactError(f"{onnx_path}: --int8 needs a Q/DQ graph; run `python -m export onnx ... --int8 "
                            "--calib-images DIR --int8-target tensorrt` first (explicit quantization)")
    if int8 and sc.provenance.get("int8", {}).get("target", "tensorrt") != "tensorrt":
        raise ArtifactError(f"{onnx_path}: this Q/DQ graph uses the CPU recipe (asymmetric uint8 activations), which "
                            "TensorRT rejects; re-export with `--int8-target tensorrt` or pass --calib-images here")
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailable("TensorRT is not installed here; build engines on the target machine "
                                 "(`pip install edgead[tensorrt]`, or JetPack on Jetson)") from e
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtifactError(f"{onnx_path}: TensorRT could not parse the graph: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
    config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
    for name in sc.calibration_initializers:
        if not network.mark_weights_refittable(name):
            log.warning("could not mark %s refittable; calibration will have to rebuild this engine", name)
    inp = network.get_input(0)
    if inp.shape[0] == -1:
        h, w = sc.input.height, sc.input.width
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, (1, h, w, 3), (max_batch, h, w, 3), (max_batch, h, w, 3))
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ArtifactError(f"{onnx_path}: TensorRT engine build failed; see the TensorRT log above")
    atomic_write_bytes(out, bytes(serialized))
    sc.backend_format = "tensorrt"
    sc.precision = "int8" if int8 else ("fp16" if fp16 else sc.precision)
    sc.provenance["tensorrt"] = {"version": trt.__version__, "onnx": onnx_path.name, "workspace_gb": workspace_gb,
                                 "max_batch": max_batch}
    write_sidecar(out, sc)
    return out
