"""One small interface every inference engine implements (ultralytics/anomalib-style)."""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..artifact import Sidecar


class BackendUnavailable(RuntimeError):
    """The engine or device for this backend is not installed/visible; the message says what to install."""


class ServerUnavailable(BackendUnavailable):
    """A remote inference server (Triton) does not answer now; the stream reconnects with back-off."""


class Backend(ABC):
    name: str = "base"

    def __init__(self, model_path: str, sidecar: Sidecar):
        self.model_path = model_path
        self.sidecar = sidecar
        self.output_names: list[str] = []  # every backend fills this: calibration checks it for "features"

    @abstractmethod
    def infer(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 [N,H,W,3] (sidecar input size and colour order) -> output name -> float32 array."""

    @property
    def provider(self) -> str:
        """Human-readable description of what actually runs the model."""
        return self.name

    def close(self) -> None:
        pass
