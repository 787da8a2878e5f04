"""``Model``: open any deployable artifact, score frames. The one code path to make fast.

    model = Model("model.onnx")             # backend from suffix + what is installed
    result = model.predict([frame_bgr])     # frames of any size, BGR uint8 (OpenCV)
    result.image_score, result.is_ng, result.anomaly_map

The backend is chosen from the file suffix (.onnx, .engine/.plan, .pt2) and, for ONNX,
from the execution providers installed. An explicit choice never falls back silently.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifact import ArtifactError, Sidecar, read_sidecar
from .backends.base import Backend, BackendUnavailable
from .preprocess import batch_frames

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch", "triton")


@dataclass
class Prediction:
    """Scores of a batch. Arrays are float32; maps at the graph's input size.

    scores: the graph's named component scores (role "component" in the sidecar, e.g.
    map_score, gaussian_score), [N] each; raw: every output as the backend returned it.
    """

    image_score: np.ndarray  # [N]
    anomaly_map: np.ndarray | None  # [N,H,W]; None only when the caller asked a remote server for scores alone
    is_ng: np.ndarray  # [N] bool
    scores: dict[str, np.ndarray]
    raw: dict[str, np.ndarray]


def is_ng(image_score: np.ndarray, threshold: float) -> np.ndarray:
    """The OK/NG decision: NG iff score >= threshold, compared in the score's float32 (as numpy compares a float32
    array with a Python float, and as the native runtime does), so every runtime decides a borderline part alike."""
    return np.asarray(image_score, np.float32) >= np.float32(threshold)


def _backend_for(path: Path, backend: str, device: str, sidecar: Sidecar) -> Backend:
    suffix = path.suffix.lower()
    if backend == "auto":
        backend = {".onnx": "onnxruntime", ".engine": "tensorrt", ".plan": "tensorrt", ".pt2": "torch"}.get(suffix)
        if backend is None:
            raise ArtifactError(f"{path}: unknown model type {suffix!r}; expected .onnx, .engine or .pt2")
    if backend == "onnxruntime":
        from .backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(str(path), sidecar, device=device)
    if backend == "tensorrt":
        if suffix == ".onnx":
            from .backends.onnxruntime_backend import OnnxRuntimeBackend

            return OnnxRuntimeBackend(str(path), sidecar, device="tensorrt")
        from .backends.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(str(path), sidecar)
    if backend == "triton":
        raise ValueError("backend triton needs --server grpc://HOST:8001 and --model-name NAME")
    if backend == "torch":
        from .backends.torch_backend import TorchBackend

        return TorchBackend(str(path), sidecar, device=device)
    raise ValueError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")


class Model:
    def __init__(self, path: str | Path | None, backend: str = "auto", device: str = "auto", warmup: int = 2,
                 verify_hash: bool = True, server: str | None = None, model_name: str | None = None,
                 class_name: str | None = None):
        if server:  # remote engine: the sidecar comes with the served repository, checked against `path` if given
            from .backends.triton_backend import TritonBackend

            self.backend = TritonBackend(server, model_name or "", path)
            self.path, self.sidecar = Path(path or model_name or "served"), self.backend.sidecar
        else:
            self.path = Path(path)
            self.sidecar = read_sidecar(self.path, verify_hash=verify_hash)
            self.backend = _backend_for(self.path, backend, device, self.sidecar)
        spec = self.sidecar.input
        self.height, self.width = spec.height, spec.width
        self.fixed_batch = spec.batch if isinstance(spec.batch, int) else None
        self.class_name = class_name
        self.threshold = self.threshold_for(class_name)
        self.components = self.sidecar.outputs_with_role("component")
        log.info("model %s on %s (input %dx%d %s, batch %s)", self.path.name, self.backend.provider,
                 self.height, self.width, spec.color_order, spec.batch)
        for _ in range(warmup):
            self.infer(np.zeros((self.fixed_batch or 1, self.height, self.width, 3), np.uint8))

    def threshold_for(self, class_name: str | None) -> float:
        """The OK/NG threshold: a product class's own (multi-class models) or the global one."""
        thr = self.sidecar.thresholds
        if class_name is None:
            return float(thr.image)
        if class_name not in thr.per_class:
            known = ", ".join(sorted(thr.per_class)) or "none yet"
            raise ArtifactError(f"{self.path}: no threshold for class {class_name!r} (calibrated: {known}); run "
                                f"`python -m calibration fit --model {self.path} --good DIR --class {class_name}`")
        return float(thr.per_class[class_name])

    @property
    def provider(self) -> str:
        return self.backend.provider

    def prepare(self, frames: list[np.ndarray]) -> np.ndarray:
        """BGR frames of any size -> uint8 NHWC batch at the graph's input size."""
        spec = self.sidecar.input
        batch = batch_frames(frames, self.height, self.width, spec.resize, spec.fit)
        if spec.color_order == "RGB":
            batch = np.ascontiguousarray(batch[..., ::-1])
        return batch

    def infer(self, batch: np.ndarray, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Prepared uint8 NHWC batch -> raw outputs. Splits/pads to a fixed engine batch size.

        ``outputs``: the names the caller needs; a remote server (Triton) sends only those back (less to
        serialize and copy per frame), local engines return every output as before."""
        if outputs is not None and getattr(self.backend, "selects_outputs", False):
            return self._infer(batch, lambda x: self.backend.infer(x, outputs=outputs))
        return self._infer(batch, self.backend.infer)

    def _infer(self, batch: np.ndarray, call) -> dict[str, np.ndarray]:
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"batch must be uint8 [N,{self.height},{self.width},3], got {batch.dtype} {batch.shape}")
        b = self.fixed_batch
        if b is None or len(batch) == b:
            return call(batch)
        parts = []
        for i in range(0, len(batch), b):
            chunk = batch[i:i + b]
            n = len(chunk)
            if n < b:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - n, 0)])
            out = call(chunk)
            parts.append({k: v[:n] for k, v in out.items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def predict(self, frames: list[np.ndarray] | np.ndarray) -> Prediction:
        """Frames (list of BGR uint8 images of any size, or one image) -> Prediction."""
        if isinstance(frames, np.ndarray) and frames.ndim in (2, 3):
            frames = [frames]
        out = self.infer(self.prepare(list(frames)))
        return self.to_prediction(out)

    def to_prediction(self, out: dict[str, np.ndarray]) -> Prediction:
        score = out["image_score"].astype(np.float32).reshape(-1)
        return Prediction(
            image_score=score,
            anomaly_map=out["anomaly_map"][:, 0] if "anomaly_map" in out else None,
            is_ng=is_ng(score, self.threshold),
            scores={k: np.asarray(out[k], np.float32).reshape(-1) for k in self.components if k in out},
            raw=out,
        )

    def close(self) -> None:
        self.backend.close()


__all__ = ["Model", "Prediction", "BackendUnavailable", "BACKENDS"]
