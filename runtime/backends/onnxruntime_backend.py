"""ONNX Runtime: CPU, CUDA and TensorRT execution providers."""
from __future__ import annotations

import logging
import os

import numpy as np

from ..artifact import ArtifactError, Sidecar
from .base import Backend, BackendUnavailable

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def session_options(threads: int | None = None):
    """The session settings every edgead ONNX Runtime session uses (benchmarks give other graphs the same)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads or os.environ.get("EDGEAD_THREADS"):
        opts.intra_op_num_threads = int(threads or os.environ["EDGEAD_THREADS"])
    # ORT's worker threads spin-wait after each run by default. On a small CPU that burns the cores the
    # capture/decode thread (or any other process) needs next: measured on 2 cores, a PyTorch model run
    # right after an ORT run took 104 ms instead of 59. Off unless EDGEAD_ORT_SPIN=1 (~8 % lower
    # model-only latency when nothing else runs).
    opts.add_session_config_entry("session.intra_op.allow_spinning", os.environ.get("EDGEAD_ORT_SPIN", "0"))
    return opts


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, model_path: str, sidecar: Sidecar, device: str = "auto", threads: int | None = None):
        super().__init__(model_path, sidecar)
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendUnavailable("onnxruntime is not installed; `pip install edgead[runtime]` (or [gpu])") from e
        available = ort.get_available_providers()
        if device == "auto":
            for dev in ("tensorrt", "cuda", "cpu"):
                if PROVIDERS[dev][0] in available:
                    break
                log.info("onnxruntime: %s skipped (%s not in this onnxruntime build)", dev, PROVIDERS[dev][0])
        elif device not in PROVIDERS:
            raise ValueError(f"device {device!r}: choose auto, cpu, cuda or tensorrt")
        else:
            dev = device
            if PROVIDERS[dev][0] not in available:
                raise BackendUnavailable(f"onnxruntime has no {PROVIDERS[dev][0]} here (available: {available}); "
                                         "install onnxruntime-gpu or choose --device cpu")
        opts = session_options(threads)
        providers = [p for p in PROVIDERS[dev] if p in available]
        if dev == "tensorrt":
            cache = os.path.join(os.path.dirname(os.path.abspath(model_path)), ".trt_cache")
            providers[0] = ("TensorrtExecutionProvider", {"trt_fp16_enable": sidecar.precision != "fp32",
                                                          "trt_engine_cache_enable": True, "trt_engine_cache_path": cache})
        try:
            self.session = ort.InferenceSession(model_path, sess_options=opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise ArtifactError(f"{model_path}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]}); "
                                "re-export the model") from e
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        missing = [k for k in sidecar.outputs if k not in self.output_names]
        if missing:
            raise ArtifactError(f"{model_path}: graph lacks outputs {missing} its sidecar promises; re-export the model")
        self._provider = self.session.get_providers()[0]

    @property
    def provider(self) -> str:
        return f"onnxruntime:{self._provider}"

    def infer(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, {self.input_name: frames})
        return dict(zip(self.output_names, outs))
