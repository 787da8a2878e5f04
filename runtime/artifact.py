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

SIDECAR_FORMAT = 1
SIDECAR_SUFFIX = ".json"

# Output names of every exported graph and what they mean. The runtime relies on these.
OUTPUT_MEANINGS: dict[str, str] = {
    "anomaly_map": "float32 [N,1,H,W], quantile-normalized combined map at input size; 0 ~ q_a, 0.1 ~ q_b of good images",
    "picturable_score": "float32 [N], EfficientAD image score (max of the normalized map)",
    "unpicturable_score": "float32 [N], Mahalanobis distance of pooled student features to the good-image Gaussian",
    "image_score": "float32 [N], PUAD score: (1-w) z_p + w max(z_u - gate, 0) of both scores z-normalized on good images",
    "features": "float32 [N,D], pooled student features (for field calibration of the Gaussian)",
    "map_st_raw": "float32 [N,1,h,w], raw student-teacher map before quantile normalization",
    "map_ae_raw": "float32 [N,1,h,w], raw student-autoencoder map before quantile normalization",
}

# Named ONNX initializers that calibration may rewrite without re-export.
CALIBRATION_INITIALIZERS = (
    "st_scale", "st_shift", "ae_scale", "ae_shift",
    "gaussian_mean", "gaussian_whitener",
    "score_center", "score_weight",
)


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
    """EfficientAD map normalization: q_a -> 0, q_b -> 0.1 for each map, as scale/shift."""

    q_st_a: float = 0.0
    q_st_b: float = 1.0
    q_ae_a: float = 0.0
    q_ae_b: float = 1.0
    quantile_a: float = 0.9
    quantile_b: float = 0.995
    n_images: int = 0

    def affine(self) -> tuple[float, float, float, float]:
        """(st_scale, st_shift, ae_scale, ae_shift) such that

        (map_st * st_scale + st_shift) + (map_ae * ae_scale + ae_shift)

        is EfficientAD's combined map: each map sent to 0 at q_a and 0.1 at q_b, then averaged
        (the averaging 0.5 is folded into the constants).
        """
        return (*_affine(self.q_st_a, self.q_st_b), *_affine(self.q_ae_a, self.q_ae_b))


def _affine(qa: float, qb: float) -> tuple[float, float]:
    span = max(qb - qa, 1e-12)
    return 0.05 / span, -0.05 * qa / span


@dataclass
class GaussianInfo:
    """Summary of the PUAD Gaussian; the arrays live in the model (named initializers)."""

    dim: int = 0
    n_images: int = 0
    estimator: str = "ledoit_wolf"
    shrinkage: float = 0.0
    condition_number: float = 0.0


@dataclass
class ScoreSpec:
    """PUAD score combination: z = (s - mean) / std, image = (1-w) z_p + w max(z_u - gate, 0).

    The gate lets the unpicturable (Gaussian) score count only beyond ``gate`` standard
    deviations of good images, so its noise on ordinary parts does not blur the picturable
    score on structural defects. ``None`` is the PUAD paper's plain sum (1-w) z_p + w z_u
    (up to a constant): what sidecars written before the gate existed mean.
    """

    picturable_mean: float = 0.0
    picturable_std: float = 1.0
    unpicturable_mean: float = 0.0
    unpicturable_std: float = 1.0
    puad_weight: float = 0.5
    puad_gate: float | None = None


@dataclass
class Thresholds:
    """OK/NG decision: image_score >= image means NG. pixel applies to anomaly_map."""

    image: float = 0.0
    pixel: float = 0.1
    method: str = "uncalibrated"
    target_fpr: float | None = None
    expected_fpr: float | None = None


@dataclass
class Sidecar:
    model_file: str
    model_sha256: str
    input: InputSpec
    model_kind: str = "efficientad-puad"
    model_name: str = ""
    backend_format: str = "onnx"  # onnx | tensorrt
    precision: str = "fp32"
    outputs: dict[str, str] = field(default_factory=lambda: dict(OUTPUT_MEANINGS))
    normalization: Normalization = field(default_factory=Normalization)
    gaussian: GaussianInfo = field(default_factory=GaussianInfo)
    score: ScoreSpec = field(default_factory=ScoreSpec)
    thresholds: Thresholds = field(default_factory=Thresholds)
    calibration_initializers: list[str] = field(default_factory=lambda: list(CALIBRATION_INITIALIZERS))
    provenance: dict[str, Any] = field(default_factory=dict)
    format: int = SIDECAR_FORMAT
    edgead_version: str = "0.1.0"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "sidecar") -> "Sidecar":
        if not isinstance(d, dict):
            raise ArtifactError(f"{source}: expected a JSON object; re-export the model to get a valid sidecar")
        fmt = d.get("format")
        if fmt != SIDECAR_FORMAT:
            raise ArtifactError(f"{source}: sidecar format {fmt!r}, this edgead reads {SIDECAR_FORMAT}; re-export the model")
        try:
            d = dict(d)
            sub = {"input": InputSpec, "normalization": Normalization, "gaussian": GaussianInfo,
                   "score": ScoreSpec, "thresholds": Thresholds}
            for key, typ in sub.items():
                if key in d:
                    d[key] = typ(**d[key])
            return cls(**d)
        except TypeError as e:
            raise ArtifactError(f"{source}: malformed sidecar ({e}); re-export the model") from e


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


def _current_umask() -> int:
    """The process umask, read without changing it (os.umask would, for a moment, for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc (not Linux): the classic read-and-restore
    os.umask(mask)
    return mask


def _take_over_mode(fd: int, path: Path) -> None:
    """Give the temporary file the target's permission bits (and owner, when allowed), or for a new
    file 0666 minus the umask, as ``open()`` would."""
    try:
        st = path.stat()
    except FileNotFoundError:
        os.fchmod(fd, 0o666 & ~_current_umask())
        return
    if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
        try:  # root recalibrating a service account's model: the service keeps owning it
            os.fchown(fd, st.st_uid, st.st_gid)
        except PermissionError:
            pass
    os.fchmod(fd, st.st_mode & 0o7777)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: never half-written.

    The result keeps the replaced file's permission bits (a service account that could read the
    old model can read the new one), or, for a new file, gets them from the umask like ``open()``.
    """
    path = Path(path)
    if not path.parent.exists():
        raise ArtifactError(f"{path}: folder {path.parent} does not exist; create it or choose another --out")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            _take_over_mode(f.fileno(), path)  # mkstemp made it 0600
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
    missing = [k for k in ("anomaly_map", "image_score") if k not in sc.outputs]
    if missing:
        raise ArtifactError(f"{sc_path}: outputs {missing} missing; re-export the model")
    return sc
