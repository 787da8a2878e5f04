"""UniAD (You et al., NeurIPS 2022): one reconstruction model for many product classes.

Pieces, in the order of the paper:

- features: frozen ImageNet EfficientNet-Lite (Lite2 by default, the nearest available relative
  of the paper's B4; ``efficientad.LiteTeacher``), several stages resized to one grid
  (stride 16 by default: 16x16 at 256 px, the paper's 14x14 at 224), standardized per channel
  on the training images, projected to ``hidden`` channels -> one token per grid cell;
- a transformer encoder and decoder reconstruct the feature tokens. Against the "identical
  shortcut" (a net that copies its input reconstructs anomalies too), three switchable ideas:
  1. neighbour-masked attention: a token may not attend to its own k x k neighbourhood
     (itself included), in every attention of encoder and decoder;
  2. layer-wise learnable queries: each decoder layer starts from its own learned query
     embedding and reads the previous layer's output only through cross-attention (off by
     default: on these features painted validation defects favoured the plain decoder, whose
     query is the previous layer's output; docs/uniad.md);
  3. feature jittering: in training, Gaussian noise scaled by each token's norm is added to
     the input tokens, so the net learns to denoise towards normal features;
- raw map: L2 distance of reconstructed vs input features per grid cell, ``[N,1,h,w]``.
  The shared deploy head normalizes, smooths, upsamples it and takes its max as the image
  score (no Gaussian: UniAD has no global component).

The model never needs the class at inference: one artifact serves every trained class; the
per-class part is only the threshold (``python -m calibration fit --class NAME``).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .. import distributed
from ..batch_share import BatchShare, draw, dropout_to_global, set_share
from .base import AnomalyModel, ExportPolicy, FamilyConfig, parse_hw
from .efficientad import LiteTeacher
from .registry import register_model

log = logging.getLogger(__name__)

LOG_EVERY = 25
MASKED = float("-inf")  # additive attention mask value: exactly zero weight after softmax


# ----------------------------------------------------------------------------- blocks
def neighbour_mask(grid: tuple[int, int], size: int) -> torch.Tensor:
    """Additive attention mask float32 [L,L], L = h*w (row-major tokens): ``MASKED`` where the key
    token lies in the ``size`` x ``size`` neighbourhood of the query token (itself included), 0 elsewhere."""
    h, w = grid
    r = size // 2
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    near = ((rows[:, None] - rows[None, :]).abs() <= r) & ((cols[:, None] - cols[None, :]).abs() <= r)
    return torch.zeros(h * w, h * w).masked_fill(near, MASKED)


def sine_position(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2-D sine position embedding float32 [h*w, dim] (DETR style: half the channels per axis)."""
    h, w = grid
    half = dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, half, 2, dtype=torch.float32) / half))

    def axis(n: int) -> torch.Tensor:
        pos = torch.arange(n, dtype=torch.float32)[:, None] * freqs[None, :]
        return torch.cat([pos.sin(), pos.cos()], 1)  # [n, half]

    ey, ex = axis(h), axis(w)
    emb = torch.cat([ey[:, None, :].expand(h, w, -1), ex[None, :, :].expand(h, w, -1)], 2).reshape(h * w, -1)
    return F.pad(emb, (0, dim - emb.shape[1]))


class Attention(nn.Module):
    """Multi-head attention with an optional additive mask; plain ops so the ONNX graph is explicit.

    q: [N,Lq,D], k/v: [N,Lk,D], mask: [Lq,Lk] additive or None -> [N,Lq,D]."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        qh, kh, vh = self._split(self.q(q)), self._split(self.k(k)), self._split(self.v(v))
        att = torch.matmul(qh, kh.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        if mask is not None:
            att = att + mask
        att = self.dropout(torch.softmax(att, dim=-1))
        o = torch.matmul(att, vh).transpose(1, 2)
        return self.out(o.reshape(o.shape[0], o.shape[1], -1))


class _FeedForward(nn.Sequential):
    def __init__(self, dim: int, ff: int, dropout: float):
        super().__init__(nn.Linear(dim, ff), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ff, dim))


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer (as UniAD): masked self-attention, feed-forward."""

    def __init__(self, dim: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.attn = Attention(dim, heads, dropout)
        self.ff = _FeedForward(dim, ff, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        qk = x + pos
        x = self.norm1(x + self.drop(self.attn(qk, qk, x, mask)))
        return self.norm2(x + self.drop(self.ff(x)))


class DecoderLayer(nn.Module):
    """UniAD decoder layer: the query is this layer's learned embedding (or, switched off, the previous
    layer's output); self-attention on it, then cross-attention to the previous layer's output."""

    def __init__(self, dim: int, heads: int, ff: int, dropout: float, tokens: int, learned_query: bool):
        super().__init__()
        self.query = nn.Parameter(torch.randn(tokens, dim)) if learned_query else None
        self.self_attn = Attention(dim, heads, dropout)
        self.cross_attn = Attention(dim, heads, dropout)
        self.ff = _FeedForward(dim, ff, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, out: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        tgt = out if self.query is None else self.query.unsqueeze(0).expand(out.shape[0], -1, -1)
        qk = tgt + pos
        tgt = self.norm1(tgt + self.drop(self.self_attn(qk, qk, tgt, mask)))
        tgt = self.norm2(tgt + self.drop(self.cross_attn(tgt + pos, out + pos, out, mask)))
        return self.norm3(tgt + self.drop(self.ff(tgt)))


def jitter_tokens(tokens: torch.Tensor, scale: float, generator: torch.Generator | None = None,
                  share: BatchShare | None = None) -> torch.Tensor:
    """UniAD's feature jittering: tokens [N,L,D] + N(0,1) * (||token|| / D) * scale (per token).

    ``share`` (DDP): tokens are this rank's rows of the global batch; the noise is the global draw's rows."""
    norms = tokens.norm(dim=2, keepdim=True) / tokens.shape[2]
    device = "cpu" if generator is None else generator.device
    noise = draw(lambda shape: torch.randn(shape, generator=generator, device=device), tuple(tokens.shape), share)
    return tokens + noise.to(tokens.device, tokens.dtype) * norms * scale


# ----------------------------------------------------------------------------- config
@dataclass
class UniADConfig(FamilyConfig):
    """Everything needed to rebuild the network from a checkpoint (stored in it as JSON)."""

    # checkpoints from before each field: bilinear tokens, the map upsampled without a grid offset
    LEGACY_DEFAULTS = {"feature_resample": "bilinear", "map_offset_px": (0.0, 0.0)}
    name: str = "uniad"
    backbone: str = "lite2"  # frozen EfficientNet-Lite: lite0 or lite2
    # Lite stages 0-3 (strides 2, 4, 8, 16): 16+24+48+120 = 208 channels for Lite2, as the paper's B4 stages 1-4.
    # Stage 0 added on painted validation of the 7-class run (mean image + pixel AUROC 1.947 vs 1.945 without it;
    # pixel AUROC higher on 7 of 7 classes; docs/uniad.md); no measurable cost in frames/s
    out_indices: tuple[int, ...] = (0, 1, 2, 3)
    feature_stride: int = 16  # token grid = input / stride (16: 16x16 tokens at 256 px)
    feature_pool: int = 1  # local averaging of the features, grid cells (1 = off, as the paper)
    # finer stages onto the token grid: "area" (each token the mean of its cell) or "bilinear" (the paper; reads 2 of
    # every 4 stride-4 pixels per axis). Area chosen on painted validation defects, 7 classes, 256 px, 1000 x 8 per
    # class: mean image + pixel AUROC 1.945 vs 1.935, image AUROC better on 6 of 7 classes (docs/uniad.md)
    feature_resample: str = "area"
    # a 2 + 2-layer transformer of width 128 (the paper: 256 wide, 4 + 4 layers, ff 1024, 8 heads; all
    # settable): 0.34 s vs 1.6 s per training step of 8 on 2 CPU cores, 15.5 ms vs 39 ms per frame model-only
    # (runtime.bench, 256 px, bench_uniad_speed_256px_*.json); chosen for the 2-core edge budget, not on a
    # test split (docs/uniad.md)
    hidden: int = 128
    heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    ff: int = 512
    dropout: float = 0.1
    neighbor_mask: bool = True  # mechanism 1
    neighbor_size: int = 0  # k of the k x k masked neighbourhood, odd; 0 = about half the grid (7 at 14x14)
    # mechanism 2, off by default: on painted validation defects (3 classes, 256 px, 700 x 8 per class) the decoder
    # without learned queries was better on every class, mean image + pixel AUROC 1.922 vs 1.829 (docs/uniad.md)
    learned_query: bool = False
    feature_jitter: bool = True  # mechanism 3 (training only)
    jitter_scale: float = 20.0
    jitter_prob: float = 1.0
    lr: float = 5e-4  # Adam learning rate (warm-up, cosine decay over a short CPU schedule); 0 = the training config's
    batch_size: int = 0  # images per step; 0 = the training config's (--batch-size)
    map_blur_px: float = 4.0
    # None: measured on the frozen features when training starts (``train.geometry``; ~(11, 10) px for the default
    # features at 256 px) and kept; (0, 0): the map upsampled as it is. Adopted on painted validation of the 7-class
    # run: pixel AUROC 0.976 -> 0.992, AUPRO 0.881 -> 0.968, higher on 7 of 7 classes (docs/uniad.md)
    map_offset_px: tuple[float, float] | None = None


def _grid(cfg: UniADConfig) -> tuple[int, int]:
    h, w = cfg.image_size
    if cfg.feature_stride not in (4, 8, 16, 32) or h % cfg.feature_stride or w % cfg.feature_stride:
        raise ValueError(f"feature stride {cfg.feature_stride}: choose 4, 8, 16 or 32 dividing the input size {w}x{h}")
    return h // cfg.feature_stride, w // cfg.feature_stride


def neighbour_size(cfg: UniADConfig, grid: tuple[int, int]) -> int:
    """The configured k, or about half the grid's short side (odd): 7 at 14x14 as the paper."""
    k = cfg.neighbor_size or ((min(grid) // 2) | 1)
    if k < 1 or k % 2 == 0:
        raise ValueError(f"neighbor_size {k}: choose an odd number of grid cells (e.g. 7), or 0 for automatic")
    if k >= grid[0] and k >= grid[1]:
        raise ValueError(f"neighbor_size {k} masks the whole {grid[1]}x{grid[0]} token grid; choose a smaller one "
                         "or a larger input size")
    return k


# ----------------------------------------------------------------------------- model
class UniAD(AnomalyModel):
    """Frozen Lite features -> transformer reconstruction -> L2 distance map for the shared deploy head."""

    family = "uniad"
    map_names = ("reconstruction",)
    # the transformer's softmax and LayerNorms over standardized features: kept fp32 (not measured in fp16)
    export_policy = ExportPolicy(fp16_parts=(), int8_keep_fp32=("/head/", "/features/"))
    config_class = UniADConfig
    # 1000 steps of 8 images per class: ~7 min per class on 2 CPU cores (features cached once). On 7 classes
    # the training loss fell 1.34 -> 0.50 by step 1000 and 0.36 by 7000 (docs/uniad.md). Not chosen on a test split.
    default_schedule = (1000, 8)
    schedule_steps_per_class = True

    def __init__(self, cfg: UniADConfig):
        if cfg.backbone not in ("lite0", "lite2"):
            raise ValueError(f"backbone {cfg.backbone!r}: choose lite0 or lite2")
        for k in ("hidden", "heads", "encoder_layers", "decoder_layers", "ff"):
            if int(getattr(cfg, k)) < 1:
                raise ValueError(f"{k} = {getattr(cfg, k)}: must be at least 1")
        grid = _grid(cfg)
        super().__init__(cfg, grid, feature_dim=0)
        self.features = LiteTeacher(f"efficientnet_{cfg.backbone}", cfg.out_indices, grid,
                                    pretrained=cfg.pretrained, pool=cfg.feature_pool, resample=cfg.feature_resample)
        c, d, tokens = self.features.channels, cfg.hidden, grid[0] * grid[1]
        self.channels = c
        self.register_buffer("feature_mean", torch.zeros(1, c, 1, 1))
        self.register_buffer("feature_std", torch.ones(1, c, 1, 1))
        self.input_proj = nn.Linear(c, d)
        self.output_proj = nn.Linear(d, c)
        self.encoder = nn.ModuleList(EncoderLayer(d, cfg.heads, cfg.ff, cfg.dropout) for _ in range(cfg.encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(d, cfg.heads, cfg.ff, cfg.dropout, tokens, cfg.learned_query)
                                     for _ in range(cfg.decoder_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.register_buffer("pos", sine_position(grid, d), persistent=False)
        self.neighbor_size = neighbour_size(cfg, grid) if cfg.neighbor_mask else 0
        mask = neighbour_mask(grid, self.neighbor_size) if cfg.neighbor_mask else None
        self.register_buffer("attn_mask", mask, persistent=False)
        self.jitter_generator: torch.Generator | None = None
        self.jitter_share: BatchShare | None = None  # this rank's rows of the global batch (DDP training)

    # -- the networks -------------------------------------------------------------
    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed [N,3,H,W] -> standardized frozen features float32 [N,C,h,w]."""
        with torch.no_grad():
            return (self.features(x) - self.feature_mean) / self.feature_std

    def grid_features(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen token features: the grid the map lives on (``train.geometry``)."""
        return self.features(x)

    def reconstruct(self, feats: torch.Tensor) -> torch.Tensor:
        """Standardized features [N,C,h,w] -> their reconstruction [N,C,h,w] (jittered input in training)."""
        n, c, h, w = feats.shape
        tokens = self.input_proj(feats.flatten(2).transpose(1, 2))  # [N,L,D]
        cfg = self.cfg
        if self.training and cfg.feature_jitter and (cfg.jitter_prob >= 1.0 or float(torch.rand(1)) < cfg.jitter_prob):
            tokens = jitter_tokens(tokens, cfg.jitter_scale, self.jitter_generator, self.jitter_share)
        x = tokens
        for layer in self.encoder:
            x = layer(x, self.pos, self.attn_mask)
        out = x
        for layer in self.decoder:
            out = layer(out, self.pos, self.attn_mask)
        rec = self.output_proj(self.decoder_norm(out))  # [N,L,C]
        return rec.transpose(1, 2).reshape(n, c, h, w)

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """x: preprocessed [N,3,H,W] -> (L2 reconstruction error [N,1,h,w] fp32, None)."""
        f = self.feature_map(x)
        rec = self.reconstruct(f)
        return torch.sqrt(torch.sum((rec - f) ** 2, dim=1, keepdim=True)), None

    def fit(self, fit_frames: np.ndarray, val_frames: np.ndarray, train_cfg, device: str) -> dict:
        return fit_uniad(self, fit_frames, val_frames, train_cfg, device)


# ----------------------------------------------------------------------------- training
def _batches(frames: np.ndarray, batch: int):
    for i in range(0, len(frames), batch):
        yield frames[i:i + batch]


@torch.no_grad()
def cache_features(model: UniAD, frames: np.ndarray, device: str) -> torch.Tensor:
    """Raw frozen features of every frame float32 [N,C,h,w]; sets the per-channel standardization.

    UniAD trains on unaugmented images, so the frozen network runs once per image, not per step."""
    raw = torch.cat([model.features(model.preprocess(torch.from_numpy(b).to(device)))
                     for b in tqdm(list(_batches(frames, 16)), desc="features", leave=False, disable=len(frames) < 64)])
    d = raw.double()
    mean = d.mean(dim=(0, 2, 3))
    std = torch.sqrt(torch.clamp(d.var(dim=(0, 2, 3)), min=1e-12))
    model.feature_mean.copy_(mean.float().view_as(model.feature_mean))
    model.feature_std.copy_(std.float().view_as(model.feature_std))
    return ((raw - model.feature_mean) / model.feature_std).contiguous()


def reconstruction_loss(model: UniAD, feats: torch.Tensor) -> torch.Tensor:
    """The training loss: MSE of the reconstruction of standardized features [N,C,h,w] (a plain batch mean)."""
    return F.mse_loss(model.reconstruct(feats), feats)


def fit_uniad(model: UniAD, fit_frames: np.ndarray, val_frames: np.ndarray, cfg, device: str) -> dict:
    """Train the transformer (the features stay frozen) to reconstruct good frames' features.

    ``cfg``: ``train.loop.TrainConfig`` (steps, batch_size, lr, weight_decay, seed). The model config's
    ``lr``/``batch_size``, when set, take precedence (UniAD's recipe differs from EfficientAD's: the
    paper trains with batch 8). Returns JSON-able facts: seconds, loss history, validation loss.
    Under torchrun every rank draws the same global batch and computes its rows (``train.batch_share``)."""
    ctx = distributed.context()
    mcfg = model.cfg
    lr = mcfg.lr or cfg.lr
    batch = mcfg.batch_size or cfg.batch_size
    if batch < 1 or cfg.steps < 1:
        raise ValueError(f"batch size {batch} and steps {cfg.steps}: both must be at least 1")
    model.to(device)
    feats = cache_features(model, fit_frames, device)
    val = ((torch.cat([model.features(model.preprocess(torch.from_numpy(b).to(device))) for b in _batches(val_frames, 16)])
            - model.feature_mean) / model.feature_std) if len(val_frames) else None
    params = [p for n, p in model.named_parameters() if not n.startswith("features.")]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    # short warm-up, then cosine decay: transformers diverge at a full Adam step from random weights
    warm = max(1, min(100, cfg.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    gen = torch.Generator().manual_seed(cfg.seed)
    share = distributed.share_of(batch, ctx)
    model.jitter_generator, model.jitter_share = gen, share
    if share is not None:
        set_share(dropout_to_global(model), share)
    loss_fn = distributed.wrap(distributed.LossModule(reconstruction_loss, model), ctx)
    history, window = [], []
    t0 = time.time()
    model.train()
    bar = tqdm(total=cfg.steps, desc=f"train {cfg.model}", dynamic_ncols=True, disable=not ctx.is_main)
    try:
        for step in range(1, cfg.steps + 1):
            idx = torch.randint(len(feats), (batch,), generator=gen)
            f = feats[(idx if share is None else share.rows(idx)).to(feats.device)]
            loss = loss_fn(f)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            window.append(loss.detach())
            if step % LOG_EVERY == 0 or step == cfg.steps:
                vals = {"step": step, "loss": float(distributed.mean_across(torch.stack(window).mean(), ctx))}
                window.clear()
                history.append(vals)
                bar.set_postfix(loss=f"{vals['loss']:.4f}")
            bar.update(1)
    finally:
        bar.close()
        model.jitter_generator, model.jitter_share = None, None
        set_share(model, None)
    model.eval()
    val_loss = None
    if val is not None:
        with torch.no_grad():
            val_loss = float(np.mean([F.mse_loss(model.reconstruct(v), v).item() for v in torch.split(val, 16)]))
    return {"train_seconds": time.time() - t0, "history": history, "final_loss": history[-1] if history else None,
            "validation_loss": val_loss, "lr": lr, "batch_size": batch, "neighbor_size": model.neighbor_size}


# ----------------------------------------------------------------------------- registered models
@register_model
def uniad(image_size=256, **kw) -> UniAD:
    """UniAD on frozen EfficientNet-Lite2 features: one model for several product classes."""
    return UniAD(UniADConfig(name="uniad", image_size=parse_hw(image_size), **kw))
