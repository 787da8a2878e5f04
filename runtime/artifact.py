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
import math
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
    # a Gaussian switched by the product's layout (calibration.layout): the measured share; when calibration
    # switched the score off, why, and the PUAD weight a later refit that switches it back on restores
    layout: float | None = None
    off_reason: str = ""
    weight_when_on: float | None = None


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
            _refuse_unknown_keys(d, cls, "")
            for key, typ in sub.items():
                if key in d:
                    if not isinstance(d[key], dict):
                        raise TypeError(f"{key!r} must be an object, got {type(d[key]).__name__}")
                    _refuse_unknown_keys(d[key], typ, f"{key}.")
                    d[key] = typ(**d[key])
            sc = cls(**d)
        except TypeError as e:
            raise ArtifactError(f"{source}: malformed sidecar ({e}); re-export the model") from e
        validate_sidecar(sc, source)
        return sc


MAX_SIDECAR_BYTES = 16 * 2**20  # real ones are a few kB
MAX_INPUT_SIDE = 8192  # pixels; a graph input larger than this is a corrupt sidecar, not a model
INPUT_LAYOUTS = ("NHWC",)
INPUT_DTYPES = ("uint8",)
COLOR_ORDERS = ("BGR", "RGB")
RESIZE_NAMES = ("area", "linear", "nearest")  # runtime.preprocess.INTERPOLATIONS (this module imports no cv2)
FIT_NAMES = ("stretch", "letterbox", "center_crop")  # runtime.preprocess.FIT_POLICIES
OPTIONAL_NUMBERS = ("target_fpr", "expected_fpr", "fit_fpr", "puad_gate", "layout", "weight_when_on")
INFORMATIVE_NUMBERS = ("condition_number",)


def _short(v: Any, n: int = 60) -> str:
    """repr of a value for an error line: escaped, at most n characters."""
    r = repr(v)
    return r if len(r) <= n else r[:n - 3] + "..."


def _refuse_unknown_keys(d: dict, typ: type, prefix: str) -> None:
    unknown = set(d) - {f.name for f in dataclasses.fields(typ)}
    if unknown:
        names = ", ".join(_short(prefix + k, 40) for k in sorted(unknown)[:3])
        raise TypeError(f"unknown key{'s' if len(unknown) > 1 else ''} {names}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_finite(v: Any) -> bool:
    return _is_number(v) and math.isfinite(v)


def validate_sidecar(sc: "Sidecar", source: str = "sidecar") -> None:
    """Refuse values that would crash or silently mislead the runtime: wrong types, NaN/inf
    constants, zero/negative/huge sizes, unknown names. One ArtifactError naming the field."""
    problems: list[str] = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    for name in ("model_file", "model_sha256", "family", "model_name", "backend_format", "precision",
                 "edgead_version"):
        v = getattr(sc, name)
        need(isinstance(v, str), f"{name} must be a string, got {_short(v)}")
    need(isinstance(sc.outputs, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in sc.outputs.items()),
         "outputs must map output names to descriptions (strings)")
    need(isinstance(sc.provenance, dict), "provenance must be an object")
    need(isinstance(sc.roles, dict) and all(r in ROLES for r in sc.roles.values()),
         f"roles must map output names to one of {', '.join(ROLES)}")
    need(isinstance(sc.head, dict) and isinstance(sc.family_params, dict), "head and family_params must be objects")
    per_class = sc.thresholds.per_class
    need(isinstance(per_class, dict) and all(isinstance(k, str) and _is_finite(v) for k, v in per_class.items()),
         "thresholds.per_class must map class names to finite numbers")
    for name in ("q_low", "q_high"):
        v = getattr(sc.normalization, name)
        need(isinstance(v, list) and all(_is_finite(x) for x in v), f"normalization.{name} must be finite numbers")
    need(isinstance(sc.calibration_initializers, list) and all(isinstance(x, str) for x in sc.calibration_initializers),
         "calibration_initializers must be a list of names")
    i = sc.input
    for name in ("height", "width"):
        v = getattr(i, name)
        need(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_INPUT_SIDE,
             f"input.{name} must be a whole number of pixels in 1..{MAX_INPUT_SIDE}, got {_short(v)}")
    need(i.layout in INPUT_LAYOUTS, f"input.layout {_short(i.layout)}: this runtime feeds {', '.join(INPUT_LAYOUTS)}")
    need(i.dtype in INPUT_DTYPES, f"input.dtype {_short(i.dtype)}: this runtime feeds {', '.join(INPUT_DTYPES)}")
    need(i.color_order in COLOR_ORDERS, f"input.color_order {_short(i.color_order)}: choose {' or '.join(COLOR_ORDERS)}")
    need(i.batch == "dynamic" or (isinstance(i.batch, int) and not isinstance(i.batch, bool) and 1 <= i.batch <= 4096),
         f"input.batch must be a positive whole number or \"dynamic\", got {_short(i.batch)}")
    need(i.resize in RESIZE_NAMES, f"input.resize {_short(i.resize)}: choose one of {', '.join(RESIZE_NAMES)}")
    need(i.fit in FIT_NAMES, f"input.fit {_short(i.fit)}: choose one of {', '.join(FIT_NAMES)}")
    need(isinstance(i.in_graph, list) and all(isinstance(x, str) for x in i.in_graph), "input.in_graph must be a list of names")
    for name in ("mean", "std"):
        v = getattr(i, name)
        need(isinstance(v, list) and len(v) == 3 and all(_is_finite(x) for x in v),
             f"input.{name} must be 3 finite numbers, got {_short(v)}")
    need(not isinstance(i.std, list) or not all(_is_number(x) for x in i.std) or all(x > 0 for x in i.std),
         f"input.std must be positive, got {_short(i.std)}")
    for group in ("normalization", "gaussian", "score", "thresholds"):
        obj = getattr(sc, group)
        for f in dataclasses.fields(obj):  # checked by the field's default; fields added later follow along
            v = getattr(obj, f.name)
            if isinstance(f.default, str):
                need(isinstance(v, str), f"{group}.{f.name} must be a string, got {_short(v)}")
            elif f.name in OPTIONAL_NUMBERS:
                need(v is None or _is_finite(v), f"{group}.{f.name} must be a finite number or null, got {_short(v)}")
            elif f.name in INFORMATIVE_NUMBERS:  # may legitimately be inf (a singular covariance)
                need(_is_number(v) and not math.isnan(v), f"{group}.{f.name} must be a number, got {_short(v)}")
            elif _is_number(f.default):
                need(_is_finite(v), f"{group}.{f.name} must be a finite number, got {_short(v)}")
    for name in ("map_std", "gaussian_std"):
        v = getattr(sc.score, name)
        need(not _is_number(v) or v > 0, f"score.{name} must be positive, got {_short(v)}")
    for name in ("n_images", "dim"):
        for group in ("normalization", "gaussian"):
            v = getattr(getattr(sc, group), name, 0)
            need(not _is_number(v) or v >= 0, f"{group}.{name} must not be negative, got {_short(v)}")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ArtifactError(f"{source}: invalid sidecar: {problems[0]}{more}; re-export the model or restore the "
                            "sidecar from its .bak")


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
    if sc_path.stat().st_size > MAX_SIDECAR_BYTES:
        raise ArtifactError(f"{sc_path}: {sc_path.stat().st_size} bytes, a sidecar is a few kB; restore it from the "
                            "export folder or its .bak")
    try:
        raw = json.loads(sc_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{sc_path}: not valid JSON ({e}); restore it from the export folder") from e
    except RecursionError as e:  # nested thousands deep: not something export writes
        raise ArtifactError(f"{sc_path}: not a sidecar (JSON nested too deeply); restore it from the export folder") from e
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
