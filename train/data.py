"""Training data: images held in memory as uint8 frames, exactly as the runtime feeds them.

Images go through ``runtime.preprocess.fit_frame`` (the deployed resize), so the
network sees the same pixels in training and on the line.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from runtime.dataset import AnomalyDataset, read_image
from runtime.preprocess import fit_frame

from .batch_share import BatchShare, draw

log = logging.getLogger(__name__)


def load_frames(paths: list[Path], size: int | tuple[int, int], desc: str = "loading", fit: str = "stretch") -> np.ndarray:
    """Image files -> uint8 [N,H,W,3] BGR at ``size`` ((height, width), or an int for a square)."""
    h, w = (size, size) if isinstance(size, int) else size
    out = np.empty((len(paths), h, w, 3), np.uint8)
    for i, p in enumerate(tqdm(paths, desc=desc, leave=False, disable=len(paths) < 50)):
        out[i] = fit_frame(read_image(p), h, w, fit=fit)
    return out


def split_train_validation(ds: AnomalyDataset, seed: int, fraction: float = 0.1) -> tuple[list[Path], list[Path]]:
    """Use validation/good when the dataset has it; else hold out ``fraction`` of train (seeded)."""
    if ds.validation:
        return list(ds.train), list(ds.validation)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(ds.train))
    n_val = max(1, int(round(fraction * len(ds.train)))) if len(ds.train) > 4 else 0
    if n_val == 0:
        log.warning("only %d training images: validation reuses them (quantiles will be optimistic)", len(ds.train))
        return list(ds.train), list(ds.train)
    val = sorted(idx[:n_val])
    fit = sorted(idx[n_val:])
    return [ds.train[i] for i in fit], [ds.train[i] for i in val]


# ----------------------------------------------------------------------------- augmentation (RGB [0,255] tensors)
def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def color_jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """EfficientAD's AE augmentation: one of brightness/contrast/saturation, factor in [0.8, 1.2]."""
    kind = int(torch.randint(3, (1,), generator=gen))
    f = float(torch.empty(1).uniform_(0.8, 1.2, generator=gen))
    if kind == 0:
        y = x * f
    elif kind == 1:
        m = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
        y = (x - m) * f + m
    else:
        g = _gray(x)
        y = (x - g) * f + g
    return y.clamp(0, 255)


def with_gain(frames: np.ndarray, gain: float | np.ndarray) -> np.ndarray:
    """uint8 frames [N,H,W,C] with their intensity scaled by ``gain`` (one number, or [N,1,1,1]), clipped."""
    scaled = frames.astype(np.float32) * np.asarray(gain, dtype=np.float32)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def relit(frames: np.ndarray, spread: float, rng: np.random.Generator) -> np.ndarray:
    """uint8 frames [N,H,W,C] under another light: each scaled by its own gain ~ U(1 - spread, 1 + spread)."""
    return with_gain(frames, rng.uniform(1.0 - spread, 1.0 + spread, size=(len(frames), 1, 1, 1)))


def penalty_images(x: torch.Tensor, gen: torch.Generator, share: BatchShare | None = None) -> torch.Tensor:
    """Stand-in for the paper's ImageNet penalty images (none here): strongly altered frames.

    Channel permutation, patch shuffling on a 4x4 grid, flips and smooth noise give
    images that are not normal parts; the student is pushed to output ~0 on them.
    ``share`` (DDP): ``x`` is this rank's rows of the global batch; the per-image noise is drawn for the
    global batch and these rows kept, so every image gets the noise one process would give it.
    """
    n, c, h, w = x.shape
    y = x[:, torch.randperm(3, generator=gen)]
    g = 4
    ph, pw = h // g, w // g
    tiles = y[:, :, : ph * g, : pw * g].reshape(n, c, g, ph, g, pw).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, c, ph, pw)
    tiles = tiles[:, torch.randperm(g * g, generator=gen)]
    y = y.clone()
    y[:, :, : ph * g, : pw * g] = tiles.reshape(n, g, g, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, ph * g, pw * g)
    if bool(torch.rand(1, generator=gen) < 0.5):
        y = torch.flip(y, dims=(3,))
    noise = draw(lambda shape: torch.rand(shape, generator=gen), (n, 3, 8, 8), share).to(x.device) * 255
    noise = F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False)
    a = float(torch.rand(1, generator=gen)) * 0.6
    return (y * (1 - a) + noise * a).clamp(0, 255)
