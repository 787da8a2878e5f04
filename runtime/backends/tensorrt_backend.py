"""Native TensorRT engines (TensorRT 10/11 Python API) with pycuda buffers.

Written against the documented API: named I/O tensors (``num_io_tensors``,
``get_tensor_name``, ``set_input_shape``, ``set_tensor_address``) and
``execute_async_v3`` on a CUDA stream, pinned host buffers and async copies.
TensorRT cannot be installed on the development or CI machines of this project:
this module is NOT exercised there (its tests skip with the reason); see README.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..artifact import ArtifactError, Sidecar
from .base import Backend, BackendUnavailable

log = logging.getLogger(__name__)


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailable("TensorRT is not installed; `pip install edgead[tensorrt]` on a machine with an "
                                 "NVIDIA GPU (JetPack ships it on Jetson)") from e
    return trt


def _import_pycuda():
    try:
        import pycuda.driver as cuda
        import pycuda.autoinit  # noqa: F401  (creates the CUDA context)
    except ImportError as e:
        raise BackendUnavailable("pycuda is not installed; `pip install pycuda` (needs the CUDA toolkit)") from e
    return cuda


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, model_path: str, sidecar: Sidecar):
        super().__init__(model_path, sidecar)
        trt = _import_tensorrt()
        self.cuda = _import_pycuda()
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(model_path).read_bytes())
        if self.engine is None:
            raise ArtifactError(f"{model_path}: TensorRT could not deserialize the engine (built by another TensorRT "
                                "version or GPU?); rebuild it with `python -m export tensorrt` on this machine")
        self.context = self.engine.create_execution_context()
        self.stream = self.cuda.Stream()
        self.inputs, self.outputs = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.inputs.append(name)
            else:
                self.outputs.append(name)
        if len(self.inputs) != 1:
            raise ArtifactError(f"{model_path}: engine has inputs {self.inputs}, expected one frames input")
        self.output_names = list(self.outputs)
        missing = [k for k in sidecar.outputs if k not in self.outputs]
        if missing:
            raise ArtifactError(f"{model_path}: engine lacks outputs {missing}; rebuild it from the exported ONNX")
        self._buffers: dict[tuple, dict] = {}

    def _alloc(self, shape: tuple) -> dict:
        """Pinned host + device buffers for one input shape (cached)."""
        if shape in self._buffers:
            return self._buffers[shape]
        cuda, trt = self.cuda, self.trt
        name_in = self.inputs[0]
        self.context.set_input_shape(name_in, shape)
        bufs = {}
        for name in self.inputs + self.outputs:
            shp = tuple(self.context.get_tensor_shape(name))
            dtype = trt.nptype(self.engine.get_tensor_dtype(name))
            host = cuda.pagelocked_empty(int(np.prod(shp)), dtype).reshape(shp)
            dev = cuda.mem_alloc(host.nbytes)
            bufs[name] = (host, dev)
        self._buffers[shape] = bufs
        return bufs

    def infer(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        cuda = self.cuda
        shape = tuple(frames.shape)
        bufs = self._alloc(shape)
        name_in = self.inputs[0]
        self.context.set_input_shape(name_in, shape)
        host_in, dev_in = bufs[name_in]
        np.copyto(host_in, frames)
        cuda.memcpy_htod_async(dev_in, host_in, self.stream)
        for name, (_, dev) in bufs.items():
            self.context.set_tensor_address(name, int(dev))
        if not self.context.execute_async_v3(stream_handle=self.stream.handle):
            raise RuntimeError("TensorRT execute_async_v3 failed; see the TensorRT log above")
        for name in self.outputs:
            host, dev = bufs[name]
            cuda.memcpy_dtoh_async(host, dev, self.stream)
        self.stream.synchronize()
        return {name: bufs[name][0].astype(np.float32, copy=True) for name in self.outputs}

    @property
    def provider(self) -> str:
        return f"tensorrt:{self.trt.__version__}"


def refit_engine(engine_path: str | Path, constants: dict[str, np.ndarray]) -> bytes:
    """Refit the named calibration weights of a refittable engine; returns the new serialized engine.

    The engine must have been built with ``BuilderFlag.REFIT_INDIVIDUAL`` and these weights
    marked refittable (``export.tensorrt_build`` does both).
    """
    trt = _import_tensorrt()
    _import_pycuda()
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise ArtifactError(f"{engine_path}: cannot deserialize engine for refit; rebuild it")
    if not engine.refittable:
        raise ArtifactError(f"{engine_path}: engine was built without refit; rebuild with `python -m export tensorrt`")
    refitter = trt.Refitter(engine, logger)
    for name, value in constants.items():
        arr = np.ascontiguousarray(value, dtype=np.float32)
        if not refitter.set_named_weights(name, trt.Weights(arr)):
            raise ArtifactError(f"{engine_path}: weights {name!r} are not refittable in this engine; rebuild it")
    missing = refitter.get_missing_weights()
    if missing:
        raise ArtifactError(f"{engine_path}: refit still misses weights {list(missing)}")
    if not refitter.refit_cuda_engine():
        raise ArtifactError(f"{engine_path}: TensorRT refit failed; rebuild the engine instead")
    return bytes(engine.serialize())
