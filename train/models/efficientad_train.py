"""EfficientAD's training (the family's ``fit``): teacher statistics, the four losses, Adam steps.

Steps (paper section 3-4): teacher feature normalization -> Adam steps on the student
(hard-feature loss + penalty) and autoencoder (+ student-on-AE), with resumable segments.
Everything after the networks (quantiles, Gaussian, score normalization, threshold) is the
shared head's, fitted by ``train.loop.calibrate_model`` afterwards.
"""
from __future__ import annotations

import io
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from runtime.artifact import atomic_write_bytes

from .. import distributed
from ..batch_share import BatchShare, dropout_to_global, mean_loss_sum, set_share
from ..data import color_jitter, penalty_images
from .efficientad import EfficientAD, head_channels

log = logging.getLogger(__name__)

LOG_EVERY = 25


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


def hard_loss(t: torch.Tensor, s: torch.Tensor, q: float, share: BatchShare | None = None) -> torch.Tensor:
    """The paper's hard-feature loss: mean of the squared errors at or above their q-quantile.

    Those are the top n - ceil(q (n-1)) elements (ties aside), so ``topk`` finds them
    without sorting (3x faster than ``torch.quantile`` on the 6M elements of a stride-4
    batch, and no 2^24-element cap). The selection has no gradient anyway; gathering the
    hard elements first keeps the squared-error backward off the full feature tensor.
    ``share``: under DDP the quantile is the global batch's (``_hard_loss_share``).
    """
    if share is not None:
        return _hard_loss_share(t, s, q, share)
    with torch.no_grad():
        d = ((t - s) ** 2).flatten()
        idx = torch.topk(d, _hard_count(d.numel(), q), sorted=False).indices
    where = torch.unravel_index(idx, t.shape)
    return F.mse_loss(s[where], t[where])


def _hard_loss_share(t: torch.Tensor, s: torch.Tensor, q: float, share: BatchShare) -> torch.Tensor:
    """``hard_loss`` of the global batch from this rank's rows: the global top-k lies within the union of
    every rank's own top-k, so only those k values per rank are gathered; the threshold is the global k-th
    largest. This rank's selected errors are summed and divided by the global count times the world size,
    so DDP's gradient average is the one-process gradient (equal to it up to ties at the threshold)."""
    with torch.no_grad():
        d = ((t - s) ** 2).flatten()
        k = _hard_count(d.numel() * share.world, q)
        top = torch.topk(d, min(k, d.numel()), sorted=False).values
        threshold = torch.topk(share.gather(top), k, sorted=False).values.min()
        idx = torch.nonzero(d >= threshold).squeeze(1)
        count = int(share.total_of(torch.tensor(idx.numel(), device=d.device)))
    where = torch.unravel_index(idx, t.shape)
    return mean_loss_sum(torch.square(s[where] - t[where]), count, share)


def _losses(model: EfficientAD, rgb: torch.Tensor, gen: torch.Generator, cfg,
            t: torch.Tensor | None = None, share: BatchShare | None = None) -> dict[str, torch.Tensor]:
    """The four EfficientAD losses for one batch of RGB [0,255] training images.

    ``t``: cached teacher features of ``rgb`` (see ``teacher_cache``). The student has no
    batch statistics, so its three inputs (image, penalty image, augmented image) run
    through its trunk as one batch, and its head computes only the half each input
    needs (``head_channels``): the same losses as three full calls, with less work.
    ``share``: this rank's rows of the global batch under DDP (None: one process).
    """
    c, n = model.channels, rgb.shape[0]
    x = model.normalize(rgb)
    if t is None:
        t = model.teacher_features(x)
    xa = model.normalize(color_jitter(rgb, gen))
    to_teacher = [x] + ([model.normalize(penalty_images(rgb, gen, share))] if cfg.penalty else [])
    student = model.student
    feats = student.trunk(torch.cat(to_teacher + [xa]).contiguous(memory_format=torch.channels_last))
    f_teacher, f_ae = torch.split(feats, [len(to_teacher) * n, n])
    s_teacher = head_channels(student, f_teacher, 0, c).float()
    sa = head_channels(student, f_ae, c, 2 * c).float()
    losses = {"hard": hard_loss(t, s_teacher[:n], cfg.hard_quantile, share)}
    if cfg.penalty:
        losses["penalty"] = torch.mean(torch.square(s_teacher[n:]))
    ta = model.teacher_features(xa)
    a = model.autoencoder(xa).float()
    losses["ae"] = F.mse_loss(a, ta)  # fused forward and backward: less memory traffic than (a - ta) ** 2
    losses["st_ae"] = F.mse_loss(sa, a)
    return losses


def fit_efficientad(model: EfficientAD, fit_frames: np.ndarray, cfg, device: str) -> dict:
    """Train student + autoencoder on uint8 NHWC good frames; returns facts for the checkpoint.

    ``cfg``: ``train.loop.TrainConfig`` (steps, batch_size, lr, weight_decay, hard_quantile, penalty,
    amp, seed, save_every, stop_at, out, resume, teacher_cache_bytes). Returns {"stopped": True,
    "resume_path": ...} when ``cfg.stop_at`` ends the segment early.

    Under torchrun (``train.distributed``) every rank draws the same global batch of ``cfg.batch_size``
    images and computes its rows; DDP averages the gradients; rank 0 alone writes ``last.pt``."""
    ctx = distributed.context()
    share = distributed.share_of(cfg.batch_size, ctx)
    out = Path(cfg.out)
    params = list(model.student.parameters()) + list(model.autoencoder.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, int(0.95 * cfg.steps)), gamma=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    seconds_before = 0.0  # training time of the segments before a resume
    last = out / "last.pt"
    if getattr(cfg, "resume", False) and last.is_file():
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
    if share is not None:
        set_share(dropout_to_global(model), share)
    losses_fn = distributed.wrap(distributed.LossModule(_losses, model), ctx)
    t0 = time.time()
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.model}", dynamic_ncols=True, disable=not ctx.is_main)
    history, window = [], []
    if cfg.amp and not device.startswith("cuda") and not _cpu_has_bf16():
        log.warning("--amp on a CPU without native bf16 (AVX512-BF16/AMX): it will likely train slower; drop --amp")
    autocast = torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16, enabled=cfg.amp)
    while step < cfg.steps:
        idx = torch.randint(len(frames_dev), (cfg.batch_size,), generator=gen)
        idx = (idx if share is None else share.rows(idx)).to(frames_dev.device)
        rgb = model.to_rgb(frames_dev[idx])
        with autocast:
            losses = losses_fn(rgb, gen, cfg, None if cached is None else cached[idx], share)
            loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        window.append({"loss": loss.detach(), **{k: v.detach() for k, v in losses.items()}})
        if step % LOG_EVERY == 0 or step == cfg.steps:  # window means: single-step losses are noisy
            vals = {k: float(distributed.mean_across(torch.stack([w[k] for w in window]).mean(), ctx)) for k in window[0]}
            window.clear()
            history.append({"step": step, **vals})
            bar.set_postfix(loss=f"{vals['loss']:.4f}", hard=f"{vals['hard']:.4f}", ae=f"{vals['ae']:.4f}")
        bar.update(1)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            _save_resume(last, model, opt, sched, gen, step, seconds_before + time.time() - t0, ctx)
        if cfg.stop_at is not None and step >= cfg.stop_at and step < cfg.steps:
            _save_resume(last, model, opt, sched, gen, step, seconds_before + time.time() - t0, ctx)
            set_share(model, None)
            bar.close()
            log.info("stopped at step %d; continue with --resume", step)
            return {"stopped": True, "resume_path": str(last)}
    bar.close()
    set_share(model, None)
    model.eval()
    if ctx.is_main and last.exists():
        last.unlink()
    return {"train_seconds": seconds_before + time.time() - t0, "history": history,
            "final_loss": history[-1] if history else None}


def _cpu_has_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels here (else bf16 autocast is emulated and slow)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _save_resume(path: Path, model, opt, sched, gen, step: int, seconds: float = 0.0,
                 ctx: distributed.DistContext | None = None) -> None:
    """Rank 0 writes the resume state atomically (every rank holds the same); the others wait for it."""
    ctx = ctx or distributed.DistContext()
    if not ctx.is_main:
        distributed.barrier(ctx)
        return
    buf = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "step": step,
                "train_seconds": seconds}, buf)
    atomic_write_bytes(path, buf.getvalue())
    distributed.barrier(ctx)
