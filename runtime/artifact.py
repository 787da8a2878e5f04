"""The deployable artifact: a model file plus a small JSON sidecar.

Every stage (train, export, calibration, runtime) reads and writes the sidecar
through this module only, so preprocessing, output meanings and decision
constants are defined once. numpy-free on purpose: it must import anywhere.

Layout on disk::

    model.onnx            the graph (or model.engine for TensorRT)
    model.onnx.json       this sidecar (``sidecar_path(model)``)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SIDECAR_FORMAT = 2
SIDECAR_SUFFIX = ".json"
SCHEMA_FILE = Path(__file__).with_name("sidecar.schema.json")

# Standard outputs of every exported graph (role "required"), and the shared head's others.
STANDARD_OUTPUTS: dict[str, tuple[str, str]] = {
    "anomaly_map": ("required", "float32 [N,1,H,W], normalized map at input size; 0 ~ q_a, 0.1 ~ q_b of good images"),
    "image_score": ("required", "float32 [N], the decision score: NG iff image_score >= thresholds.image"),
    "map_score": ("component", "float32 [N], max of the normalized, smoothed map"),
    "gaussian_score": ("component", "float32 [N], Mahalanobis distance of pooled features to the good-image Gaussian"),
    "features": ("raw", "float32 [N,D], pooled features (field calibration fits the Gaussian on them)"),
    "raw_maps": ("raw", "float32 [N,K,h,w], the family's raw maps before normalization (field calibration)"),
}
ROLES = ("required", "component", "raw")


class ArtifactError(ValueError):
    """A model file or sidecar that cannot be used as it is; the message says what to do."""


@dataclass
class InputSpec:
    """What the graph's input tensor is. Frames are resized on the host to (height, width)."""

    height: int
    width: int
    layout: str = "NHWC"
    dtype: str = "uint8"
    color_order: str = "BGR"  # OpenCV's order: camera frames go in unconverted
    batch: int | str = 1  # fixed size, or "dynamic"
    resize: str = "area"  # host-side cv2 interpolation used to fit frames to (height, width)
    fit: str = "stretch"  # how a frame of another aspect is fitted: stretch | letterbox | center_crop
    in_graph: list[str] = field(default_factory=lambda: ["cast", "color_order", "scale_1/255", "mean_std", "to_NCHW"])
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # RGB, on [0,1]
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class Normalization:
    """Map normalization of the head: each raw map k sent to 0 at its q_a and 0.1 at its q_b
    quantile over good images, then the K maps averaged (``head.map_affine``)."""

    map_names: list[str] = field(default_factory=list)
    q_low: list[float] = field(default_factory=list)
    q_high: list[float] = field(default_factory=list)
    quantile_a: float = 0.9
    quantile_b: float = 0.995
    n_images: int = 0


@dataclass
class GaussianInfo:
    """Summary of the Gaussian component (dim 0 = the family has none); arrays live in the model."""

    dim: int = 0
    n_images: int = 0
    estimator: str = "ledoit_wolf"
    shrinkage: float = 0.0
    condition_number: float = 0.0


@dataclass
class ScoreSpec:
    """Score mix: z = (s - mean) / std; image = (1-w) z_map + w max(z_gauss - gate, 0).

    Without a Gaussian component, image = z_map. The gate lets the Gaussian score count only
    beyond ``gate`` standard deviations of good images, so its noise on ordinary parts does not
    blur the map score on structural defects; ``None`` is the PUAD paper's plain sum.
    """

    map_mean: float = 0.0
    map_std: float = 1.0
    gaussian_mean: float = 0.0
    gaussian_std: float = 1.0
    puad_weight: float = 0.5
    puad_gate: float | None = None


@dataclass
class Thresholds:
    """OK/NG decision: image_score >= image means NG. pixel applies to anomaly_map.

    per_class: thresholds of a multi-class model per product class (``--class NAME``);
    expected_fpr: false-alarm rate at ``image`` estimated on held-out scores of good images;
    fit_fpr: the deployed model's false-alarm rate on the calibration images themselves.
    """

    image: float = 0.0
    pixel: float = 0.1
    method: str = "uncalibrated"
    target_fpr: float | None = None
    expected_fpr: float | None = None
    fit_fpr: float | None = None
    per_class: dict[str, float] = field(default_factory=dict)


@dataclass
class Sidecar:
    model_file: str
    model_sha256: str
    input: InputSpec
    family: str = ""
    model_name: str = ""
    backend_format: str = "onnx"  # onnx | tensorrt | torch
    precision: str = "fp32"
    outputs: dict[str, str] = field(default_factory=dict)  # name -> meaning
    roles: dict[str, str] = field(default_factory=dict)  # name -> required | component | raw
    head: dict[str, Any] = field(default_factory=dict)  # map_names, smoothing_px, has_gaussian
    normalization: Normalization = field(default_factory=Normalization)
    gaussian: GaussianInfo = field(default_factory=GaussianInfo)
    score: ScoreSpec = field(default_factory=ScoreSpec)
    thresholds: Thresholds = field(default_factory=Thresholds)
    calibration_initializers: list[str] = field(default_factory=list)
    family_params: dict[str, Any] = field(default_factory=dict)  # opaque to every runtime
    provenance: dict[str, Any] = field(default_factory=dict)
    format: int = SIDECAR_FORMAT
    edgead_version: str = "0.2.0"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def outputs_with_role(self, role: str) -> list[str]:
        return [k for k, r in self.roles.items() if r == role]

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "sidecar") -> "Sidecar":
        if not isinstance(d, dict):
            raise ArtifactError(f"{source}: expected a JSON object; re-export the model to get a valid sidecar")
        fmt = d.get("format")
        if fmt == 1:
            raise ArtifactError(f"{source}: sidecar format 1 (edgead 0.1); re-export the model with "
                                "`python -m export onnx CHECKPOINT --out MODEL` (checkpoints of 0.1 still load)")
        if fmt != SIDECAR_FORMAT:
            raise ArtifactError(f"{source}: sidecar format {fmt!r}, this edgead reads {SIDECAR_FORMAT}; re-export the model")
        try:
            d = dict(d)
            sub = {"input": InputSpec, "normalization": Normalization, "gaussian": GaussianInfo,
                   "score": ScoreSpec, "thresholds": Thresholds}
            for key, typ in sub.items():
                if key in d:
                    if not isinstance(d[key], dict):
                        raise TypeError(f"{key!r} must be an object")
                    d[key] = typ(**d[key])
            sc = cls(**d)
        except TypeError as e:
            raise ArtifactError(f"{source}: malformed sidecar ({e}); re-export the model") from e
        bad = {k: r for k, r in sc.roles.items() if r not in ROLES}
        if bad:
            raise ArtifactError(f"{source}: unknown output roles {bad}; re-export the model")
        return sc


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """The sidecar belongs next to the model: ``model.onnx`` -> ``model.onnx.json``."""
    p = Path(model_path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: never half-written."""
    path = Path(path)
    if not path.parent.exists():
        raise ArtifactError(f"{path}: folder {path.parent} does not exist; create it or choose another --out")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_sidecar(model_path: str | os.PathLike, sidecar: Sidecar) -> Path:
    """Write the sidecar for ``model_path``, stamping the model's current hash and file name."""
    model_path = Path(model_path)
    sidecar.model_file = model_path.name
    sidecar.model_sha256 = file_sha256(model_path)
    out = sidecar_path(model_path)
    atomic_write_text(out, json.dumps(sidecar.to_dict(), indent=2, sort_keys=False) + "\n")
    log.info("wrote sidecar %s", out)
    return out


def read_sidecar(model_path: str | os.PathLike, verify_hash: bool = True) -> Sidecar:
    """Read and validate the sidecar of ``model_path``; raise ArtifactError with a fix on any mismatch."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ArtifactError(f"{model_path}: model file not found; pass the .onnx/.engine written by `python -m export`")
    sc_path = sidecar_path(model_path)
    if not sc_path.is_file():
        raise ArtifactError(f"{sc_path}: sidecar missing; it is written by `python -m export` next to the model, copy it along")
    try:
        raw = json.loads(sc_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{sc_path}: not valid JSON ({e}); restore it from the export folder") from e
    sc = Sidecar.from_dict(raw, source=str(sc_path))
    if sc.model_file != model_path.name:
        log.warning("sidecar %s names model %s, opened %s", sc_path, sc.model_file, model_path.name)
    if verify_hash:
        actual = file_sha256(model_path)
        if actual != sc.model_sha256:
            raise ArtifactError(
                f"{model_path}: hash {actual[:12]} does not match its sidecar ({sc.model_sha256[:12]}); "
                "the model or the sidecar was replaced - copy both from the same export or re-run calibration")
    missing = [k for k in STANDARD_OUTPUTS if STANDARD_OUTPUTS[k][0] == "required" and k not in sc.outputs]
    if missing:
        raise ArtifactError(f"{sc_path}: outputs {missing} missing; re-export the model")
    return sc
