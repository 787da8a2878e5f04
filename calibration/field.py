"""Field calibration: refit every decision constant of a deployed artifact from good frames.

Runs the deployed model (through the runtime, no torch) over good images, keeps its raw outputs
(raw maps, pooled features), and fits the head's constants with ``calibration.headfit`` -- the same
procedure training uses -- scoring every candidate through the graph's own post-network part
(``calibration.graph_part``), so thresholds are set on the scores the deployed model produces.
The artifact is rewritten atomically with a backup; any failure leaves it byte-identical.
Nothing here names a model family: what a graph has is read from its sidecar roles.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from runtime.artifact import ArtifactError, read_sidecar, sidecar_path, write_sidecar
from runtime.dataset import is_grey
from runtime.model import Model

from . import fitting, memory
from .fitting import CalibrationError
from .graph_part import GraphPart, source_graph
from .headfit import HeadFit, fit_head, gaussian_optional
from .layout import ROLLED_IMAGES, gaussian_switch, layout_cells, layout_fraction, rolled_frames

log = logging.getLogger(__name__)

ASPECT_TOLERANCE = 0.1  # relative slack around the training images' aspect range


def iter_images(source: str, max_images: int | None = None) -> Iterable[np.ndarray]:
    """Frames from a folder of images, a video file, or ``camera:N`` (through the runtime's sources)."""
    from itertools import islice

    from runtime.sources import CaptureSource, FolderSource, SourceError

    p = Path(source)
    try:
        if source.startswith("camera:"):
            src = CaptureSource(int(source.split(":", 1)[1]), "camera")
        elif p.is_dir():
            src = FolderSource(p)
        elif p.is_file():
            src = CaptureSource(str(p), "video")
        else:
            raise CalibrationError(f"{source}: not found; pass a folder of good images, a video file or camera:N")
        try:
            yield from islice(src.frames(), max_images)
        finally:
            src.close()
    except SourceError as e:
        raise CalibrationError(f"{e}; pass a folder of good images, a video file or camera:N") from e


def batched(items: Iterable, n: int) -> Iterator[list]:
    """Lists of up to n consecutive items (itertools.batched needs Python 3.12; JetPack has 3.10)."""
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class FrameCheck:
    """What the training images were: colour or not, their range of aspects (width / height)."""

    colour: bool | None = None
    aspect_range: tuple[float, float] | None = None
    fit: str = "stretch"

    @classmethod
    def from_sidecar(cls, sc) -> "FrameCheck":
        prov = sc.provenance
        rng = prov.get("source_aspects")
        shape = prov.get("source_shape")
        if rng is None and shape:  # artifacts that recorded one training image's shape
            rng = [shape[1] / shape[0]] * 2
        colour = None if not shape else shape[2] == 3
        if "source_colour" in prov:
            colour = bool(prov["source_colour"])
        return cls(colour, tuple(rng) if rng else None, sc.input.fit)

    def check(self, frame: np.ndarray, where: str) -> None:
        """Refuse frames whose colour or aspect the model never saw (wrong camera or setting)."""
        if self.colour and is_grey(frame):
            raise CalibrationError(f"{where}: grayscale image, but the model was trained on colour images; "
                                   "use the colour camera setting")
        if self.aspect_range is None or self.fit != "stretch":
            return  # letterbox / center_crop keep the geometry of any aspect
        lo, hi = self.aspect_range
        aspect = frame.shape[1] / frame.shape[0]
        if not lo / (1 + ASPECT_TOLERANCE) <= aspect <= hi * (1 + ASPECT_TOLERANCE):
            span = f"{lo:.2f}" if abs(hi - lo) < 1e-3 else f"{lo:.2f}-{hi:.2f}"
            raise CalibrationError(f"{where}: image is {frame.shape[1]}x{frame.shape[0]} (aspect {aspect:.2f}), training "
                                   f"images had aspect {span}; crop the camera image like the training images, "
                                   "or pass --any-aspect if this view is intended")


ROLLED_PREFIX = "rolled:"  # Collected.extra key of the patch features of calibration.layout.rolled_frames


@dataclass
class Collected:
    raw_maps: np.ndarray  # float32 [N,K,h,w]
    features: np.ndarray | None  # float32 [N,D] (families with a Gaussian component)
    extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # e.g. patch features for a memory
    colour: bool | None = None  # any of the images in colour (None: not recorded)

    def __len__(self) -> int:
        return len(self.raw_maps)


def collect(model: Model, frames: Iterable[np.ndarray], batch: int = 8, desc: str = "good images",
            any_aspect: bool = False, any_colour: bool = False, layout: bool = True) -> Collected:
    """Run the deployed model over frames; keep its raw outputs (role 'raw' in the sidecar).

    ``any_colour``: grey images are accepted by a colour-trained model (onboarding a new product onto a
    graph whose memory is refit from these very images: the new product defines what normal looks like).
    ``layout``: a graph whose Gaussian follows the layout also gets the patch features of the first images shifted
    (``calibration.layout``; good images only)."""
    sc = model.sidecar
    has_gaussian = "features" in sc.roles
    extra = memory.extra_raw_outputs(sc)  # [] for graphs without a memory
    need = ["raw_maps"] + (["features"] if has_gaussian else []) + extra
    missing = [k for k in need if k not in model.backend.output_names]
    if missing:
        raise CalibrationError(f"{model.path}: model lacks outputs {missing} needed for calibration; "
                               "re-export it with `python -m export onnx`")
    check = FrameCheck.from_sidecar(sc)
    if any_aspect:
        check.aspect_range = None
    if any_colour:
        check.colour = None
    seen_colour = False
    maps, feats = [], []
    more: dict[str, list[np.ndarray]] = {k: [] for k in extra}
    by_layout = layout and has_gaussian and bool(extra) and gaussian_switch(sc.family_params) == "layout"
    kept: list[np.ndarray] = []  # the first prepared frames, to measure the layout on (calibration.layout)

    def checked():
        nonlocal seen_colour
        for i, f in enumerate(frames):
            check.check(f, f"image {i}")
            seen_colour = seen_colour or not is_grey(f)
            yield f

    for chunk in batched(tqdm(checked(), desc=desc, leave=False), batch):
        prepared = model.prepare(chunk)
        if by_layout and len(kept) < ROLLED_IMAGES:
            kept.extend(prepared[:ROLLED_IMAGES - len(kept)])
        out = model.infer(prepared)
        maps.append(np.asarray(out["raw_maps"], np.float32))
        if has_gaussian:
            feats.append(np.asarray(out["features"], np.float32))
        for k in extra:
            more[k].append(np.asarray(out[k], np.float32))
    if not maps:
        raise CalibrationError("no images were read")
    extras = {k: np.concatenate(v) for k, v in more.items()}
    if by_layout and len(kept) >= 2:
        rolled = rolled_frames(np.stack(kept))
        extras[ROLLED_PREFIX + extra[0]] = np.concatenate(
            [np.asarray(model.infer(rolled[i:i + batch])[extra[0]], np.float32) for i in range(0, len(rolled), batch)])
    return Collected(np.concatenate(maps), np.concatenate(feats) if has_gaussian else None, extras, colour=seen_colour)


@dataclass
class CalibrationResult(HeadFit):
    class_name: str | None = None
    memory: dict | None = None  # what a memory refit did (graphs with a memory)
    source_colour: bool | None = None  # a memory refit: whether the images it was fit on were in colour
    seconds: float | None = None  # wall time of the whole fit (reading images included)


def graph_scorer(model_path: Path, sc) -> GraphPart:
    return GraphPart(source_graph(Path(model_path), sc), "features" in sc.roles)


def compute(model: Model, good: Collected, defects: Collected | None = None, target_fpr: float = 0.01,
            puad_weight: float | None = None, estimator: str = "ledoit_wolf",
            puad_gate: float | None | object = fitting.KEEP_GATE) -> CalibrationResult:
    """Every head constant from good images, scored by the graph's own post-network part."""
    sc = model.sidecar
    w = sc.score.puad_weight if puad_weight is None else puad_weight
    if puad_weight is None and sc.gaussian.estimator == "off" and sc.gaussian.weight_when_on is not None:
        w = sc.gaussian.weight_when_on  # a previous fit switched the Gaussian off (weight 0): this one may turn it on
    gate = sc.score.puad_gate if puad_gate is fitting.KEEP_GATE else puad_gate
    mem = None
    if memory.MemorySpec.from_sidecar(sc) is not None:  # a new memory first; the head is fit on its held-out maps
        mem, good, defects = _refit_memory(model, good, defects)
    scorer = graph_scorer(model.path, sc)
    layout = None
    if good.features is not None and gaussian_switch(sc.family_params) == "layout":
        name = memory.MemorySpec.from_sidecar(sc).features_output if mem is not None else ""
        feats, rolled = good.extra.get(name), good.extra.get(ROLLED_PREFIX + name)
        if feats is None or rolled is None:
            raise CalibrationError("the Gaussian score follows the layout, but the graph gave no patch features to "
                                   "measure it on; re-export the model with this edgead")
        layout = layout_fraction(layout_cells(feats), layout_cells(rolled))
    fit = fit_head(good.raw_maps, good.features, scorer, list(sc.head.get("map_names", [])),
                   puad_weight=w, puad_gate=gate, target_fpr=target_fpr,
                   defects=None if defects is None else (defects.raw_maps, defects.features), estimator=estimator,
                   gaussian_optional=gaussian_optional(sc.family_params), layout=layout)
    result = CalibrationResult(**{f.name: getattr(fit, f.name) for f in dataclasses.fields(HeadFit)})
    if mem is not None:
        result.constants.update(mem.constants)
        # what the deployed graph will say about these very images (its memory holds their patches)
        result.good_scores = np.asarray(scorer(result.constants, mem.deployed_raw_maps, good.features)["image_score"],
                                        np.float64)
        result.thresholds.fit_fpr = float((result.good_scores >= result.thresholds.image).mean())
        result.memory = mem.info
        result.source_colour = good.colour
    return result


def _refit_memory(model: Model, good: Collected, defects: Collected | None):
    """A graph with a memory: new memory from the good images; raw maps of good images held out from
    it (2-fold) and of defect images scored by it."""
    spec = memory.MemorySpec.from_sidecar(model.sidecar)
    src = source_graph(model.path, model.sidecar)
    mem = memory.fit_memory(src, model.sidecar, good.extra[spec.features_output])
    good = Collected(mem.heldout_raw_maps, good.features, good.extra, colour=good.colour)
    if defects is not None:
        maps = memory.MemoryScorer(src, spec)(mem.constants[spec.initializer], defects.extra[spec.features_output])
        defects = Collected(maps, defects.features, defects.extra)
    return mem, good, defects


def compute_class_threshold(model: Model, good: Collected, class_name: str, target_fpr: float = 0.01) -> CalibrationResult:
    """A per-class threshold of a multi-class model: the model's current constants, this class's good images."""
    from runtime.artifact import GaussianInfo

    part = graph_scorer(model.path, model.sidecar)
    consts = current_constants(model.path, model.sidecar)
    scores = part(consts, good.raw_maps, good.features)["image_score"]
    thr = fitting.threshold_at_fpr(scores, target_fpr)
    thr.fit_fpr = float((scores >= thr.image).mean())
    sc = model.sidecar
    return CalibrationResult(consts, sc.normalization, sc.gaussian if sc.gaussian else GaussianInfo(), sc.score, thr,
                             len(good), scores, scores, None, class_name=class_name)


def current_constants(model_path: Path, sc) -> dict[str, np.ndarray]:
    """The calibration initializers as stored in the artifact's (source) ONNX."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(source_graph(Path(model_path), sc)))
    inits = {i.name: i for i in m.graph.initializer}
    return {n: numpy_helper.to_array(inits[n]) for n in sc.calibration_initializers if n in inits}


def write_onnx_constants(model_path: Path, constants: dict[str, np.ndarray]) -> bytes:
    """The ONNX bytes with the named initializers replaced (shape and dtype kept)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(model_path))
    inits = {i.name: i for i in m.graph.initializer}
    for name, value in constants.items():
        if name not in inits:
            raise CalibrationError(f"{model_path}: no initializer {name!r}; re-export the model with `python -m export onnx`")
        old = numpy_helper.to_array(inits[name])
        new = np.asarray(value, dtype=old.dtype)
        if new.size != old.size:
            raise CalibrationError(f"{model_path}: constant {name!r} has {new.size} values, the graph holds {old.size}; "
                                   "re-export the model")
        inits[name].CopyFrom(numpy_helper.from_array(new.reshape(old.shape), name))
    return m.SerializeToString()


def apply(model_path: str | Path, result: CalibrationResult, source: str, backup: bool = True) -> Path:
    """Rewrite the artifact's constants and sidecar atomically; keep ``.bak`` copies of both."""
    from runtime.artifact import atomic_write_bytes

    model_path = Path(model_path)
    sc = read_sidecar(model_path)
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if result.class_name is not None:  # per-class threshold only: the graph is unchanged
        data = None
    else:
        suffix = model_path.suffix.lower()
        if suffix == ".onnx":
            data = write_onnx_constants(model_path, result.constants)
        elif suffix in (".engine", ".plan"):
            from runtime.backends.tensorrt_backend import refit_engine

            data = refit_engine(model_path, result.constants)
        else:
            raise ArtifactError(f"{model_path}: calibration rewrites .onnx and TensorRT engines; re-export {suffix} models")
    if backup:
        shutil.copy2(model_path, model_path.with_name(model_path.name + ".bak"))
        shutil.copy2(sidecar_path(model_path), sidecar_path(model_path).with_name(sidecar_path(model_path).name + ".bak"))
    record = {"date": date, "source": source, "n_images": result.n_images}
    if result.memory:
        record["memory"] = result.memory
        if result.source_colour is not None:  # the onboarded product now defines the camera's colour setting
            sc.provenance["source_colour"] = bool(result.source_colour)
    if result.class_name is not None:
        sc.thresholds.per_class[result.class_name] = result.thresholds.image
        sc.provenance.setdefault("class_calibration", {})[result.class_name] = {
            **record, "target_fpr": result.thresholds.target_fpr, "fit_fpr": result.thresholds.fit_fpr}
    else:
        per_class = sc.thresholds.per_class
        if per_class:
            log.warning("the constants changed: per-class thresholds %s were dropped; refit them with --class",
                        sorted(per_class))
        sc.normalization = result.normalization
        sc.gaussian = result.gaussian
        sc.score = result.score
        sc.thresholds = result.thresholds
        sc.provenance["calibration"] = record
        # hardening #26: good-score statistics for `calibration report`'s drift check (calibration/drift.py)
        from .drift import reference_stats
        sc.provenance["calibration"]["good_scores"] = reference_stats(result.good_scores)
    # write the model first, then the sidecar stamped with the new hash; a crash between the two
    # is detected by the hash check and repaired from the .bak files
    if data is not None:
        atomic_write_bytes(model_path, data)
    write_sidecar(model_path, sc)
    return model_path


def calibrate(model_path: str | Path, good: str, defects: str | None = None, target_fpr: float = 0.01,
              max_images: int | None = None, puad_weight: float | None = None, dry_run: bool = False,
              puad_gate: float | None | object = fitting.KEEP_GATE, backup: bool = True,
              class_name: str | None = None, any_aspect: bool = False) -> CalibrationResult:
    """Refit every constant of a deployed model on good images and rewrite it in place.

    ``class_name``: only fit that product class's threshold of a multi-class model (constants kept).
    ``backup=False`` for a model the caller has just written itself (export's INT8 refit):
    a ``.bak`` of it would only be litter."""
    t0 = time.perf_counter()
    model = Model(model_path, warmup=0)
    onboarding = class_name is None and memory.MemorySpec.from_sidecar(model.sidecar) is not None
    g = collect(model, iter_images(good, max_images), any_aspect=any_aspect, any_colour=onboarding)
    if class_name is not None:
        result = compute_class_threshold(model, g, class_name, target_fpr)
    else:
        d = collect(model, iter_images(defects, max_images), desc="defect images", any_aspect=any_aspect, layout=False,
                    any_colour=onboarding) if defects else None
        result = compute(model, g, d, target_fpr, puad_weight, puad_gate=puad_gate)
    model.close()
    if not dry_run:
        apply(model_path, result, source=str(good), backup=backup)
    result.seconds = time.perf_counter() - t0
    if result.memory:
        log.info("new %s memory: %d rows from %d good images (%d patches)%s", result.memory.get("method", "coreset"),
                 result.memory["rows"], result.memory["n_images"], result.memory["patches"],
                 "" if dry_run else f"; previous model kept as {Path(model_path).name}.bak" if backup else "")
    log.info("done in %.1fs", result.seconds)
    log.info("calibrated %s on %d images: threshold %.4f (%s), expected FPR %s, FPR on these images %s",
             model_path, result.n_images, result.thresholds.image, result.thresholds.method,
             result.thresholds.expected_fpr, result.thresholds.fit_fpr)
    return result


def summary(result: CalibrationResult) -> dict:
    return {"n_images": result.n_images, "class": result.class_name, "seconds": result.seconds, "memory": result.memory,
            "normalization": dataclasses.asdict(result.normalization),
            "gaussian": dataclasses.asdict(result.gaussian), "score": dataclasses.asdict(result.score),
            "thresholds": dataclasses.asdict(result.thresholds),
            "good_scores": {"min": float(result.good_scores.min()), "median": float(np.median(result.good_scores)),
                            "max": float(result.good_scores.max())}}
