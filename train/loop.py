"""The EfficientAD training loop and the first calibration, producing an edgead checkpoint.

Steps (paper section 3-4): teacher feature normalization -> 70k Adam steps on the
student (hard-feature loss + penalty) and autoencoder (+ student-on-AE) -> map
quantiles on held-out good images -> PUAD Gaussian on pooled student features of the
training images -> score normalization and threshold on held-out good images.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from calibration import fitting
from runtime.artifact import ArtifactError, atomic_write_bytes
from runtime.dataset import open_dataset

from .data import color_jitter, load_frames, penalty_images, split_train_validation
from .models import create_model
from .models.efficientad import EfficientAD, build_from_config, head_channels

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "edgead-checkpoint/1"
PAPER_STEPS = 70_000
LOG_EVERY = 25


@dataclass
class TrainConfig:
    data: str
    out: str
    model: str = "efficientad_lite"
    image_size: int = 256
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


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, model: EfficientAD, extra: dict) -> None:
    """State dict + JSON-able metadata, written atomically (never a pickled module)."""
    blob = {"format": CHECKPOINT_FORMAT, "config": model.cfg.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}
    buf = io.BytesIO()
    torch.save(blob, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[EfficientAD, dict]:
    """Rebuild the model from a checkpoint; clear errors for wrong files."""
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
    model = build_from_config(cfg)
    model.load_state_dict(blob["state_dict"])
    model.cfg.pretrained = blob["config"].get("pretrained", True)
    return model.eval(), blob


# ----------------------------------------------------------------------------- helpers
def source_shape(path: Path) -> list[int]:
    """[height, width, channels] of a training image as stored (channels 1 = grayscale)."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    ch = 1 if img.ndim == 2 else img.shape[2]
    if ch >= 3 and np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2]):
        ch = 1
    return [int(img.shape[0]), int(img.shape[1]), 1 if ch == 1 else 3]

def _batches(frames: np.ndarray, batch: int):
    for i in range(0, len(frames), batch):
        yield frames[i:i + batch]


@torch.no_grad()
def teacher_statistics(model: EfficientAD, frames: np.ndarray, device: str) -> None:
    """Channel-wise mean/std of teacher features over the training images."""
    s1 = s2 = None
    n = 0
    for b in _batches(frames, 16):
        t = model.teacher(model.preprocess(torch.from_numpy(b).to(device))).double()
        s1 = t.sum(dim=(0, 2, 3)) if s1 is None else s1 + t.sum(dim=(0, 2, 3))
        s2 = (t * t).sum(dim=(0, 2, 3)) if s2 is None else s2 + (t * t).sum(dim=(0, 2, 3))
        n += t.shape[0] * t.shape[2] * t.shape[3]
    mean = s1 / n
    std = torch.sqrt(torch.clamp(s2 / n - mean * mean, min=1e-12))
    model.teacher_mean.copy_(mean.float().view_as(model.teacher_mean))
    model.teacher_std.copy_(std.float().view_as(model.teacher_std))


@torch.no_grad()
def run_outputs(model: EfficientAD, frames: np.ndarray, device: str, batch: int = 16,
                keys=("map_st_raw", "map_ae_raw", "features", "picturable_score", "unpicturable_score",
                      "image_score", "anomaly_map")) -> dict[str, np.ndarray]:
    """Deployed-graph outputs for uint8 frames, stacked as float32 numpy."""
    model.eval()
    return _stacked((model(torch.from_numpy(b).to(device)) for b in _batches(frames, batch)), keys)


def _stacked(outputs, keys) -> dict[str, np.ndarray]:
    """The named outputs of successive batches, concatenated as float32 numpy."""
    acc: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for out in outputs:
        for k in keys:
            acc[k].append(out[k].float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in acc.items()}


RAW_KEYS = ("map_st_raw", "map_ae_raw", "features")  # network outputs that every other output derives from


def raw_outputs(model: EfficientAD, frames: np.ndarray, device: str) -> dict[str, np.ndarray]:
    """The networks' outputs only (raw maps, pooled features): run once, re-score with ``rescore``."""
    return run_outputs(model, frames, device, keys=RAW_KEYS)


@torch.no_grad()
def rescore(model: EfficientAD, raw: dict[str, np.ndarray], device: str, batch: int = 64,
            keys=("picturable_score", "unpicturable_score", "image_score", "anomaly_map")) -> dict[str, np.ndarray]:
    """Deployed outputs of stored ``raw_outputs`` under the model's current constants and smoothing,
    without running the networks (``EfficientAD.decide``; maps at the model's input size)."""
    size = (model.cfg.image_size, model.cfg.image_size)
    parts = zip(*(_batches(raw[k], batch) for k in RAW_KEYS))
    return _stacked((model.decide(*(torch.from_numpy(p).to(device) for p in part), size) for part in parts), keys)


def fit_map_normalization(raw_val: dict[str, np.ndarray]):
    """EfficientAD's q_a/q_b from the ``raw_outputs`` of held-out good images (the smoothing comes
    after the affine step and keeps constants, so it does not change them)."""
    return fitting.map_quantiles(raw_val["map_st_raw"], raw_val["map_ae_raw"])


def calibrate_model(model: EfficientAD, fit_frames: np.ndarray, val_frames: np.ndarray, device: str,
                    puad_weight: float = 0.5, target_fpr: float = 0.01,
                    puad_gate: float | None = fitting.DEFAULT_PUAD_GATE) -> dict:
    """First calibration: quantiles, Gaussian, score normalization, threshold. Returns sidecar parts.

    The networks run once per image; each constant-fitting step re-scores the stored outputs."""
    raw_val = raw_outputs(model, val_frames, device)
    norm = fit_map_normalization(raw_val)
    feats = run_outputs(model, fit_frames, device, keys=("features",))["features"]
    g = fitting.fit_gaussian(feats)
    st_scale, st_shift, ae_scale, ae_shift = norm.affine()
    model.set_calibration(st_scale, st_shift, ae_scale, ae_shift, g.mean, g.whitener, [0, 0], [0.5, 0.5])
    out = rescore(model, raw_val, device, keys=("picturable_score", "unpicturable_score"))
    spec = fitting.score_normalization(out["picturable_score"], out["unpicturable_score"], puad_weight, puad_gate)
    center, weight = fitting.score_constants(spec)
    model.set_calibration(st_scale, st_shift, ae_scale, ae_shift, g.mean, g.whitener, center, weight)
    scores = rescore(model, raw_val, device, keys=("image_score",))["image_score"]
    thr = fitting.threshold_at_fpr(scores, target_fpr)
    return {"normalization": dataclasses.asdict(norm), "gaussian": dataclasses.asdict(g.info),
            "score": dataclasses.asdict(spec), "thresholds": dataclasses.asdict(thr)}


@torch.no_grad()
def teacher_cache(model: EfficientAD, frames: np.ndarray, device: str, budget_bytes: int) -> torch.Tensor | None:
    """Normalized fp32 teacher features of every training image, or None if over budget.

    The paper feeds the student/teacher pair the unaugmented image, so its teacher target
    never changes: computing it once removes one of the two teacher passes per step
    (the teacher is the most expensive network of the Lite models). Exact, fp32, no autocast.
    """
    c, (h, w) = model.channels, model.grid
    size = len(frames) * c * h * w * 4
    if size > budget_bytes:
        log.info("teacher cache would take %.0f MiB (budget %.0f MiB): computing teacher targets every step",
                 size / 2 ** 20, budget_bytes / 2 ** 20)
        return None
    feats = [model.teacher_features(model.preprocess(torch.from_numpy(b).to(device))) for b in _batches(frames, 16)]
    return torch.cat(feats).contiguous()


def _hard_count(n: int, q: float) -> int:
    return max(1, n - math.ceil(q * (n - 1)))


def hard_loss(t: torch.Tensor, s: torch.Tensor, q: float) -> torch.Tensor:
    """The paper's hard-feature loss: mean of the squared errors at or above their q-quantile.

    Those are the top n - ceil(q (n-1)) elements (ties aside), so ``topk`` finds them
    without sorting (3x faster than ``torch.quantile`` on the 6M elements of a stride-4
    batch, and no 2^24-element cap). The selection has no gradient anyway; gathering the
    hard elements first keeps the squared-error backward off the full feature tensor.
    """
    with torch.no_grad():
        d = ((t - s) ** 2).flatten()
        idx = torch.topk(d, _hard_count(d.numel(), q), sorted=False).indices
    where = torch.unravel_index(idx, t.shape)
    return F.mse_loss(s[where], t[where])


def _losses(model: EfficientAD, rgb: torch.Tensor, gen: torch.Generator, cfg: TrainConfig,
            t: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The four EfficientAD losses for one batch of RGB [0,255] training images.

    ``t``: cached teacher features of ``rgb`` (see ``teacher_cache``). The student has no
    batch statistics, so its three inputs (image, penalty image, augmented image) run
    through its trunk as one batch, and its head computes only the half each input
    needs (``head_channels``): the same losses as three full calls, with less work.
    """
    c, n = model.channels, rgb.shape[0]
    x = model.normalize(rgb)
    if t is None:
        t = model.teacher_features(x)
    xa = model.normalize(color_jitter(rgb, gen))
    to_teacher = [x] + ([model.normalize(penalty_images(rgb, gen))] if cfg.penalty else [])
    student = model.student
    feats = student.trunk(torch.cat(to_teacher + [xa]).contiguous(memory_format=torch.channels_last))
    f_teacher, f_ae = torch.split(feats, [len(to_teacher) * n, n])
    s_teacher = head_channels(student, f_teacher, 0, c).float()
    sa = head_channels(student, f_ae, c, 2 * c).float()
    losses = {"hard": hard_loss(t, s_teacher[:n], cfg.hard_quantile)}
    if cfg.penalty:
        losses["penalty"] = torch.mean(torch.square(s_teacher[n:]))
    ta = model.teacher_features(xa)
    a = model.autoencoder(xa).float()
    losses["ae"] = F.mse_loss(a, ta)  # fused forward and backward: less memory traffic than (a - ta) ** 2
    losses["st_ae"] = F.mse_loss(sa, a)
    return losses


# ----------------------------------------------------------------------------- main entry
def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train, calibrate and write ``<out>/checkpoint.pt``; returns its path."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = cfg.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu")
    ds = open_dataset(cfg.data, require_test=False)
    fit_paths, val_paths = split_train_validation(ds, cfg.seed)
    fit_frames = load_frames(fit_paths, cfg.image_size, "train images")
    src_shape = source_shape(fit_paths[0])
    val_frames = load_frames(val_paths, cfg.image_size, "validation images")
    log.info("%d training, %d validation images at %dx%d", len(fit_frames), len(val_frames), cfg.image_size, cfg.image_size)

    model = create_model(cfg.model, image_size=cfg.image_size, pretrained=cfg.pretrained, **cfg.model_kwargs).to(device)
    params = list(model.student.parameters()) + list(model.autoencoder.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, int(0.95 * cfg.steps)), gamma=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    seconds_before = 0.0  # training time of the segments before a resume
    last = out / "last.pt"
    if resume and last.is_file():
        blob = torch.load(last, map_location=device, weights_only=False)
        model.load_state_dict(blob["state_dict"])
        opt.load_state_dict(blob["optimizer"])
        sched.load_state_dict(blob["scheduler"])
        gen.set_state(blob["generator"])
        torch.set_rng_state(blob["torch_rng"])
        step = int(blob["step"])
        seconds_before = float(blob.get("train_seconds", 0.0))
        log.info("resumed from %s at step %d", last, step)
    else:
        teacher_statistics(model, fit_frames, device)

    frames_dev = torch.from_numpy(fit_frames).to(device)
    cached = teacher_cache(model, fit_frames, device, cfg.teacher_cache_bytes)
    model.to(memory_format=torch.channels_last)  # faster convolutions on CPU (oneDNN) and CUDA
    t0 = time.time()
    model.train()
    log_path = out / "train_log.jsonl"
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.model}", dynamic_ncols=True)
    history, window = [], []
    if cfg.amp and not device.startswith("cuda") and not _cpu_has_bf16():
        log.warning("--amp on a CPU without native bf16 (AVX512-BF16/AMX): it will likely train slower; drop --amp")
    autocast = torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16, enabled=cfg.amp)
    while step < cfg.steps:
        idx = torch.randint(len(frames_dev), (cfg.batch_size,), generator=gen).to(frames_dev.device)
        rgb = model.to_rgb(frames_dev[idx])
        with autocast:
            losses = _losses(model, rgb, gen, cfg, None if cached is None else cached[idx])
            loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        window.append({"loss": loss.detach(), **{k: v.detach() for k, v in losses.items()}})
        if step % LOG_EVERY == 0 or step == cfg.steps:  # window means: single-step losses are noisy
            vals = {k: float(torch.stack([w[k] for w in window]).mean()) for k in window[0]}
            window.clear()
            history.append({"step": step, **vals})
            bar.set_postfix(loss=f"{vals['loss']:.4f}", hard=f"{vals['hard']:.4f}", ae=f"{vals['ae']:.4f}")
        bar.update(1)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            _save_resume(last, model, opt, sched, gen, step, seconds_before + time.time() - t0)
        if cfg.stop_at is not None and step >= cfg.stop_at and step < cfg.steps:
            _save_resume(last, model, opt, sched, gen, step, seconds_before + time.time() - t0)
            bar.close()
            log.info("stopped at step %d; continue with --resume", step)
            return last
    bar.close()
    train_seconds = seconds_before + time.time() - t0
    model.eval()
    smoothing = apply_map_blur(model, cfg.map_blur, val_frames, device, cfg.seed)
    parts = calibrate_model(model, fit_frames, val_frames, device, cfg.puad_weight, cfg.target_fpr, cfg.puad_gate)
    with open(log_path, "w") as f:
        for h in history:
            f.write(json.dumps(h) + "\n")
    ckpt = out / "checkpoint.pt"
    save_checkpoint(ckpt, model, {
        **parts,
        "map_smoothing": smoothing,
        "source_shape": src_shape,
        "train": {**dataclasses.asdict(cfg), "train_seconds": train_seconds, "n_fit": len(fit_frames),
                  "n_validation": len(val_frames), "final_loss": history[-1] if history else None,
                  "torch": str(torch.__version__)},
    })
    if last.exists():
        last.unlink()
    log.info("wrote %s (%.1fs training)", ckpt, train_seconds)
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


def apply_map_blur(model: EfficientAD, map_blur: float | str | None, val_frames: np.ndarray, device: str,
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


def _cpu_has_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels here (else bf16 autocast is emulated and slow)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _save_resume(path: Path, model, opt, sched, gen, step: int, seconds: float = 0.0) -> None:
    buf = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "step": step,
                "train_seconds": seconds}, buf)
    atomic_write_bytes(path, buf.getvalue())
