"""The training entry for every model family, the first calibration, and checkpoints.

``train(cfg)``: load good images (one folder, or several product classes) at the input size
(by default derived from the training images' aspect) -> the family's own ``fit`` (its losses
and steps) -> optional map-smoothing choice -> the shared head's constants fitted by
``calibration.headfit`` (the same procedure field calibration runs) -> ``checkpoint.pt``.
Nothing here names a family: the registry builds the model, the checkpoint records its family.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from calibration import fitting
from calibration.headfit import fit_head, gaussian_optional
from runtime.artifact import ArtifactError, atomic_write_bytes
from runtime.dataset import open_dataset

from . import distributed
from .data import load_frames, split_train_validation
from .geometry import apply_grid_offset
from .models import build_from_config, create_model, default_image_size
from .models.base import AnomalyModel, parse_hw, size_for_aspect

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "edgead-checkpoint/1"
PAPER_STEPS = 70_000
LEGACY_FAMILY = "efficientad"  # checkpoints written before families were recorded


@dataclass
class TrainConfig:
    data: str | list[str]  # one class folder, or several (one per product class: a multi-class model)
    out: str
    model: str = "efficientad_lite"
    # N: about N x N pixels at the training aspect; 'WxH': exact; None: the model's own default (registry)
    image_size: int | str | tuple[int, int] | None = None
    fit: str = "stretch"  # how frames of another aspect are fitted (runtime.preprocess.FIT_POLICIES)
    steps: int = PAPER_STEPS
    batch_size: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-5
    hard_quantile: float = 0.999
    penalty: bool = True
    puad_weight: float = 0.5
    puad_gate: float | None = fitting.DEFAULT_PUAD_GATE  # None: the PUAD paper's plain sum
    target_fpr: float = 0.01
    seed: int = 0
    device: str = "cpu"
    save_every: int = 5000
    pretrained: bool = True
    amp: bool = False  # bf16 autocast (CUDA, or CPUs with AVX512-BF16/AMX): ~2x faster training on such CPUs
    teacher_cache_bytes: int = 1 << 30  # cache teacher features of the (unaugmented) training images up to this size
    model_kwargs: dict = dataclasses.field(default_factory=dict)  # e.g. {"teacher": "lite0"} for s/m
    stop_at: int | None = None  # stop resumably after this step (split a long run; resume with --resume)
    map_blur: float | str | None = None  # map smoothing sigma (px at 256); "auto": chosen on painted defects; None: model default
    resume: bool = False


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, model: AnomalyModel, extra: dict) -> None:
    """State dict + JSON-able metadata, written atomically (never a pickled module)."""
    blob = {"format": CHECKPOINT_FORMAT, "family": model.family, "config": model.cfg.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}
    buf = io.BytesIO()
    torch.save(blob, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[AnomalyModel, dict]:
    """Rebuild the model of any registered family from a checkpoint; clear errors for wrong files."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: checkpoint not found; train one with `python -m train --data DIR --out DIR`")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        raise ArtifactError(f"{path}: not a readable edgead checkpoint ({type(e).__name__}); re-run training") from e
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise ArtifactError(f"{path}: not an edgead checkpoint (format {blob.get('format') if isinstance(blob, dict) else type(blob).__name__!r}); "
                            "pass the checkpoint.pt written by `python -m train`")
    cfg = dict(blob["config"])
    cfg["pretrained"] = False  # weights come from the state dict
    try:
        model = build_from_config(blob.get("family", LEGACY_FAMILY), cfg)
    except (KeyError, ValueError, TypeError) as e:
        raise ArtifactError(f"{path}: cannot rebuild the model ({e})") from e
    model.load_state_dict(model.upgrade_state_dict(blob["state_dict"]))
    model.cfg.pretrained = blob["config"].get("pretrained", True)
    return model.eval(), blob


# ----------------------------------------------------------------------------- running the graph in torch
def _batches(frames: np.ndarray, batch: int):
    for i in range(0, len(frames), batch):
        yield frames[i:i + batch]


def _stacked(outputs, keys) -> dict[str, np.ndarray]:
    """The named outputs of successive batches, concatenated as float32 numpy."""
    acc: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for out in outputs:
        for k in keys:
            acc[k].append(out[k].float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in acc.items()}


@torch.no_grad()
def run_outputs(model: AnomalyModel, frames: np.ndarray, device: str, batch: int = 16,
                keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Deployed-graph outputs (default: all) for uint8 frames, stacked as float32 numpy."""
    model.eval()
    keys = tuple(model.output_names()) if keys is None else keys
    return _stacked((model(torch.from_numpy(b).to(device)) for b in _batches(frames, batch)), keys)


def raw_keys(model: AnomalyModel) -> tuple[str, ...]:
    """The network outputs every other output derives from: raw maps (+ features)."""
    return ("raw_maps", "features") if model.head.feature_dim else ("raw_maps",)


def raw_outputs(model: AnomalyModel, frames: np.ndarray, device: str) -> dict[str, np.ndarray]:
    """The networks' outputs only: run once, re-score with ``rescore``."""
    return run_outputs(model, frames, device, keys=raw_keys(model))


@torch.no_grad()
def rescore(model: AnomalyModel, raw: dict[str, np.ndarray], device: str, batch: int = 64,
            keys=("map_score", "image_score", "anomaly_map"), out_hw: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Deployed outputs of stored ``raw_outputs`` under the model's current constants and smoothing,
    without running the networks (the shared head; maps at the model's input size)."""
    size = out_hw or (model.cfg.height, model.cfg.width)
    maps = raw["raw_maps"]
    feats = raw.get("features")
    parts = []
    for i in range(0, len(maps), batch):
        f = None if feats is None else torch.from_numpy(feats[i:i + batch]).to(device)
        parts.append(model.decide(torch.from_numpy(maps[i:i + batch]).to(device), f, size))
    return _stacked(parts, keys)


def torch_scorer(model: AnomalyModel, device: str):
    """A ``calibration.headfit.Scorer`` over the torch head this model's graph is exported from."""
    names = ("map_score", "image_score") + (("gaussian_score",) if model.head.feature_dim else ())

    def score(constants: dict[str, np.ndarray], raw_maps: np.ndarray, features: np.ndarray | None) -> dict[str, np.ndarray]:
        saved = model.head.constants()
        try:
            model.head.write(**constants)
            raw = {"raw_maps": raw_maps, **({} if features is None else {"features": features})}
            out = rescore(model, raw, device, keys=names, out_hw=model.grid)
        finally:
            model.head.write(**saved)
        return {k: v.astype(np.float64) for k, v in out.items()}

    return score


def calibrate_model(model: AnomalyModel, fit_frames: np.ndarray, val_frames: np.ndarray, device: str,
                    puad_weight: float = 0.5, target_fpr: float = 0.01,
                    puad_gate: float | None = fitting.DEFAULT_PUAD_GATE,
                    classes: tuple[list[str], list[str]] | None = None) -> dict:
    """First calibration: the head's constants from held-out good images (Gaussian on the training
    images), by ``calibration.headfit.fit_head`` -- the procedure field calibration runs too. Families that
    set ``heldout_fit`` (a memory) add their out-of-sample training maps, as a field refit does.

    ``classes``: (class of each fit frame, of each validation frame) of a multi-class run: each class also gets
    its own threshold (``thresholds.per_class``, what ``--class NAME`` deploys), at the same target FPR on
    that class's held-out scores -- never on images the model was trained on, which score lower than new
    good parts and would give thresholds that raise false alarms.

    The networks run once per image; each fitting step re-scores the stored outputs."""
    raw_val = raw_outputs(model, val_frames, device)
    gfeat = None
    held = model.heldout_fit
    if held is not None:  # every image out-of-sample: one set, the Gaussian 2-fold inside fit_head (as in the field)
        raw_val = {k: np.concatenate([held[k], raw_val[k]]) for k in raw_val}
    elif model.head.feature_dim:
        gfeat = run_outputs(model, fit_frames, device, keys=("features",))["features"]
    layout = None if held is None else held.get("layout")  # a Gaussian switched by the layout: the fit images' share
    fit = fit_head(raw_val["raw_maps"], raw_val.get("features"), torch_scorer(model, device), list(model.head.map_names),
                   puad_weight=puad_weight, puad_gate=puad_gate, target_fpr=target_fpr, gaussian_features=gfeat,
                   gaussian_optional=gaussian_optional(model.family_params()), layout=layout)
    model.head.write(**fit.constants)
    model.calibrated.fill_(True)
    thresholds = dataclasses.asdict(fit.thresholds)
    if classes is not None and len(set(classes[1])) > 1:
        of_score = (list(classes[0]) if held is not None else []) + list(classes[1])  # the order of raw_val
        thresholds["per_class"] = per_class_thresholds(fit.heldout_scores, of_score, target_fpr)
    return {"normalization": dataclasses.asdict(fit.normalization), "gaussian": dataclasses.asdict(fit.gaussian),
            "score": dataclasses.asdict(fit.score), "thresholds": thresholds}


FEW_CLASS_IMAGES = 10  # below this many held-out images a class's threshold is set, with a warning


def per_class_thresholds(heldout_scores: np.ndarray, classes: list[str], target_fpr: float) -> dict[str, float]:
    """Each class's image threshold at ``target_fpr`` on its own held-out good images' scores."""
    scores = np.asarray(heldout_scores, np.float64)
    if len(scores) != len(classes):
        raise ValueError(f"{len(scores)} held-out scores for {len(classes)} class labels")
    labels = np.asarray(classes)
    out = {}
    for name in sorted(set(classes)):
        own = scores[labels == name]
        out[name] = float(fitting.threshold_at_fpr(own, target_fpr).image)
        if len(own) < FEW_CLASS_IMAGES:
            log.warning("class %s: its threshold comes from only %d held-out images; refit it with `python -m "
                        "calibration fit --model M --good DIR --class %s` on 20 or more good images not used in "
                        "training", name, len(own), name)
    log.info("per-class thresholds (held-out images, target FPR %g): %s", target_fpr,
             {k: round(v, 4) for k, v in out.items()})
    return out


def fit_map_normalization(model: AnomalyModel, raw_val: dict[str, np.ndarray]) -> None:
    """Only the map affine (q_a/q_b) from held-out good images' raw maps: enough to score maps."""
    scale, shift = fitting.map_affine(fitting.map_quantiles(raw_val["raw_maps"], model.head.map_names))
    model.head.write(map_scale=scale, map_shift=shift)


# ----------------------------------------------------------------------------- data
@dataclass
class TrainingImages:
    fit: np.ndarray  # uint8 [N,H,W,3] BGR
    val: np.ndarray
    fit_classes: list[str]
    val_classes: list[str]
    source_shape: list[int]  # [h, w, channels] of the first training image
    aspects: tuple[float, float]  # range of width/height over the training images
    colour: bool
    image_size: tuple[int, int]


def load_training_images(cfg: TrainConfig) -> TrainingImages:
    """Good images of every class folder, split into fit/validation per class, at the input size."""
    datas = [cfg.data] if isinstance(cfg.data, (str, Path)) else list(cfg.data)
    if not datas:
        raise ValueError("no --data folder given")
    splits = []
    for d in datas:
        ds = open_dataset(d, require_test=False)
        fit_paths, val_paths = split_train_validation(ds, cfg.seed)
        splits.append((Path(d).name, fit_paths, val_paths))
    names = [s[0] for s in splits]
    if len(set(names)) != len(names):
        raise ValueError(f"class folders must have distinct names, got {names}")
    shapes: list[tuple[int, ...]] = []
    all_fit = [p for _, f, _ in splits for p in f]
    from runtime.dataset import is_grey, read_image

    for p in all_fit[:: max(1, len(all_fit) // 64)]:  # aspects and colour from up to 64 images
        img = read_image(p)
        shapes.append((img.shape[0], img.shape[1], 1 if is_grey(img) else 3))
    aspects = [w / h for h, w, _ in shapes]
    size = cfg.image_size if cfg.image_size is not None else default_image_size(cfg.model)
    explicit = isinstance(size, (tuple, list)) or "x" in str(size).lower()
    hw = parse_hw(size) if explicit else size_for_aspect(float(np.median(aspects)), int(size))
    fit, val, fit_cls, val_cls = [], [], [], []
    for name, f, v in splits:
        fit.append(load_frames(f, hw, f"train images {name}", cfg.fit))
        val.append(load_frames(v, hw, f"validation images {name}", cfg.fit))
        fit_cls += [name] * len(f)
        val_cls += [name] * len(v)
    first = shapes[0]
    return TrainingImages(np.concatenate(fit), np.concatenate(val), fit_cls, val_cls, [int(x) for x in first],
                          (float(min(aspects)), float(max(aspects))), any(s[2] == 3 for s in shapes), hw)


# ----------------------------------------------------------------------------- main entry
def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train any registered family, calibrate its head and write ``<out>/checkpoint.pt``; returns its path.

    Under ``torchrun --nproc_per_node N -m train ...`` every process runs this; the family's ``fit`` trains
    with DDP at the global batch ``cfg.batch_size`` (``train.distributed``), then rank 0 alone calibrates and
    writes the log and the checkpoint. Without torchrun: one process, exactly as before."""
    ctx = distributed.setup(cfg.device)
    try:
        path = _train(cfg, resume, ctx)
    except BaseException:
        distributed.cleanup(ctx, ok=False)
        raise
    distributed.cleanup(ctx)
    return path


def _train(cfg: TrainConfig, resume: bool, ctx: distributed.DistContext) -> Path:
    if not ctx.is_main:  # rank 0 alone logs progress; the others only warnings
        logging.getLogger().setLevel(logging.WARNING)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.resume = cfg.resume or resume
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = ctx.device if ctx.distributed else cfg.device  # cuda:LOCAL_RANK under torchrun
    imgs = load_training_images(cfg)
    h, w = imgs.image_size
    log.info("%d training, %d validation images at %dx%d (WxH)", len(imgs.fit), len(imgs.val), w, h)
    model = create_model(cfg.model, image_size=imgs.image_size, pretrained=cfg.pretrained, **cfg.model_kwargs).to(device)
    model.train_classes = list(imgs.fit_classes)
    geometry = apply_grid_offset(model, device)
    facts = model.fit(imgs.fit, imgs.val, cfg, device)
    if facts.get("stopped"):
        return Path(facts["resume_path"])
    ckpt = out / "checkpoint.pt"
    if not ctx.is_main:  # the weights are rank 0's too (DDP kept them equal): it alone calibrates and writes
        return ckpt
    if ctx.distributed:
        facts["world_size"] = ctx.world_size
    model.eval()
    smoothing = apply_map_blur(model, cfg.map_blur, imgs.val, device, cfg.seed)
    multi = not isinstance(cfg.data, (str, Path))
    parts = calibrate_model(model, imgs.fit, imgs.val, device, cfg.puad_weight, cfg.target_fpr, cfg.puad_gate,
                            classes=(imgs.fit_classes, imgs.val_classes) if multi else None)
    history = facts.pop("history", [])
    with open(out / "train_log.jsonl", "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    classes = sorted(set(imgs.fit_classes)) if multi else None
    save_checkpoint(ckpt, model, {
        **parts,
        "map_smoothing": smoothing,
        "map_geometry": geometry,
        "source_shape": imgs.source_shape,
        "source_aspects": list(imgs.aspects),
        "source_colour": imgs.colour,
        "fit": cfg.fit,
        "classes": classes,
        "train": {**dataclasses.asdict(cfg), "n_fit": len(imgs.fit), "n_validation": len(imgs.val),
                  "torch": str(torch.__version__), **facts},
    })
    log.info("wrote %s (%.1fs training)", ckpt, facts.get("train_seconds", 0.0))
    return ckpt


def parse_map_blur(text: str) -> float | str:
    """CLI value of --map-blur: a sigma >= 0 in px at 256 px, or 'auto'."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"--map-blur takes a sigma >= 0 (px at 256 px; 0 = off) or 'auto', got {text!r}")
    return v


def apply_map_blur(model: AnomalyModel, map_blur: float | str | None, val_frames: np.ndarray, device: str,
                   seed: int = 0) -> dict:
    """Set the map smoothing of a trained model (before calibration); returns what was done, for the checkpoint."""
    if map_blur is None:
        return {"sigma_px_at_256": model.cfg.map_blur_px, "how": "model default"}
    if map_blur == "auto":
        from .select_smoothing import choose_map_smoothing

        choice = choose_map_smoothing(model, val_frames, device, seed=seed)
        return {"sigma_px_at_256": choice.sigma, "how": "chosen on painted validation defects", **choice.to_dict()}
    model.set_map_smoothing(parse_map_blur(map_blur))
    return {"sigma_px_at_256": model.cfg.map_blur_px, "how": "given"}
