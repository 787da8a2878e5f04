"""Cross-class anomaly detection (One-for-All / PMAD, AAAI 2023, on a CPU budget): one model, trained once
on many classes, onboarded to a new product by fitting its prototypes from good images, without training.

Pieces, in the order of the method:

- patch tokens: frozen ImageNet EfficientNet-Lite2 stages 2+3 (``LiteTeacher``, shared with EfficientAD-lite
  and the memory bank), on a stride-8 grid (32x32 tokens at 256 px, the memory bank's), locally averaged;
- prototypes: K k-means centres of the class's good patch features, held in ONE named initializer
  ``prototypes`` [C+1, K] (``calibration.memory`` layout: features and squared norm per column), which
  ``python -m calibration fit`` recomputes torch-free from a new product's good images;
- masked feature prediction: a small transformer sees the tokens with one group of patches masked and
  predicts the masked patches' features from the visible tokens and from cross-attention to the
  prototypes. ``mask_groups`` complementary masks (2x2 blocks of patches in a checkerboard of 2x2 blocks)
  cover every patch exactly once; the masked copies are stacked in the batch dimension, so the deployed
  graph predicts every patch in one pass;
- maps: ``prediction_error`` (mean squared error of the predicted feature) and ``prototype_distance``
  (mean squared distance to the nearest prototype); the shared head normalizes and combines them,
  image score = map maximum.

Training is episodic: the frozen features of every training class are computed once; each episode picks
a class, one of its prototype sets (k-means of a random 10-100-image subset, as onboarding would see), a
batch of that class's images not in the subset and one mask group (1/G of the fused graph's cost), and
trains the predictor to predict the masked features.
The model so learns to use whatever prototypes it is given. Under torchrun every rank draws the same
episodes and trains on its rows of each (``fit_crossclass``).

The prototypes are read by the graph only as the direct operand of MatMuls (attention logits, attention
values, nearest distance), so no exporter folds them into an unnamed constant a refit would leave stale.
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

from calibration.memory import kmeans, memory_matrix, patches

from .. import distributed
from ..batch_share import BatchShare, mean_loss_sum
from .base import AnomalyModel, ExportPolicy, FamilyConfig, build_on_lite
from .patchcore import FEATURES_OUTPUT, FrozenPatchFeatures, nearest_squared_distance
from .registry import register_model

log = logging.getLogger(__name__)

PROTOTYPES_INITIALIZER = "prototypes"
EXTRACT_BATCH = 16  # frames per backbone pass when caching training features


@dataclass
class CrossClassConfig(FamilyConfig):
    """Everything needed to rebuild the model from a checkpoint (stored in it as JSON)."""

    name: str = "crossclass_lite"
    backbone: str = "lite2"  # frozen ImageNet EfficientNet-Lite: lite0 or lite2
    out_indices: tuple[int, ...] = (2, 3)
    stride: int = 8  # token grid, px per cell (32x32 tokens at 256 px: the memory bank's grid)
    pool: int = 3  # local averaging window of the features, in grid cells (1 = off)
    dim: int = 128  # transformer token width
    layers: int = 2
    heads: int = 4
    ff: int = 256
    prototypes: int = 512  # K k-means centres (fixed in the exported graph)
    kmeans_iters: int = 10
    mask_groups: int = 4  # complementary masks, 2x2-patch blocks in a 2x2 checkerboard (1 block group each)
    proto_images: tuple[int, int] = (10, 100)  # training: prototypes from this many images of the class
    proto_sets: int = 6  # training: prototype sets precomputed per class
    lr: float = 5e-4
    episode_batch: int = 8
    map_blur_px: float = 4.0


# ----------------------------------------------------------------------------- blocks
class TokenLinear(nn.Linear):
    """nn.Linear on [B,P,in] tokens as a 2-D Gemm with -1 batch reshapes: a graph exported at batch 1 then
    still runs any batch (graph simplifiers otherwise bake the export batch into their Gemm reshapes, and
    calibration runs cut-out parts of the graph on many images at once)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = int(x.shape[-2])
        return super().forward(x.reshape(-1, self.in_features)).reshape(-1, p, self.out_features)


def mask_groups(grid: tuple[int, int], groups: int) -> torch.Tensor:
    """float32 [G, h*w]: 1 where group g is masked. Groups tile 2x2-patch blocks in a 2x2 block checkerboard
    (G=4); G=2 pairs them diagonally; G=1 masks everything (prototypes only). Each patch in exactly one group."""
    h, w = grid
    i = torch.arange(h).view(-1, 1).expand(h, w)
    j = torch.arange(w).view(1, -1).expand(h, w)
    block = ((i // 2) % 2) * 2 + (j // 2) % 2  # 0..3
    if groups == 4:
        g = block
    elif groups == 2:
        g = ((block == 1) | (block == 2)).long()  # blocks 0,3 -> 0; 1,2 -> 1
    elif groups == 1:
        g = torch.zeros_like(block)
    else:
        raise ValueError(f"mask_groups {groups}: choose 1, 2 or 4")
    return torch.stack([(g == k).float().reshape(-1) for k in range(groups)])


class PrototypeMemory(nn.Module):
    """The class's prototypes as one buffer ``prototypes`` float32 [C+1, K] (column = [p, ||p||^2]).

    Every use is a MatMul with the buffer itself as an operand (see the module docstring)."""

    def __init__(self, capacity: int, dim: int):
        super().__init__()
        if capacity < 1:
            raise ValueError(f"prototypes {capacity}: choose at least 1")
        self.dim = dim
        self.register_buffer("prototypes", torch.zeros(dim + 1, capacity))

    def attend(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """q [B,P,C] -> prototype mixture [B,P,C]; weights softmax(scale * q.p) over the prototypes.

        ``[q, 0] . [p, ||p||^2] = q.p``: a dot product (a distance-shaped logit cancels large norms in float32,
        which made calibration's batched scores drift from the deployed ones by > 1e-4)."""
        logits = torch.matmul(F.pad(q, (0, 1), value=0.0), self.prototypes) * scale  # [B,P,K]
        attn = torch.softmax(logits, dim=-1)
        ctx = torch.matmul(self.prototypes, attn.transpose(1, 2))  # [B,C+1,P]
        return ctx[:, : self.dim, :].transpose(1, 2)

    def distance(self, a: torch.Tensor) -> torch.Tensor:
        """a [N,P,C] -> mean squared distance to the nearest prototype [N,P] (>= 0)."""
        p = int(a.shape[1])
        d2 = nearest_squared_distance(a.reshape(-1, self.dim), self.prototypes)  # exact: the memory bank's search
        return d2.reshape(-1, p) / self.dim


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.qkv = TokenLinear(dim, 3 * dim)
        self.out = TokenLinear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, d = int(x.shape[1]), int(x.shape[2])
        hd = d // self.heads
        qkv = self.qkv(x).reshape(-1, p, 3, self.heads, hd).permute(2, 0, 3, 1, 4)  # [3,B,H,P,hd]
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * (hd ** -0.5), dim=-1)
        return self.out(torch.matmul(attn, v).transpose(1, 2).reshape(-1, p, d))


class PredictorLayer(nn.Module):
    """Pre-norm: self-attention over tokens, cross-attention to the prototypes, MLP."""

    def __init__(self, dim: int, heads: int, ff: int, feat_dim: int):
        super().__init__()
        self.n1, self.n2, self.n3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.to_query = TokenLinear(dim, feat_dim)
        self.from_proto = TokenLinear(feat_dim, dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(feat_dim ** -0.5)))
        self.mlp = nn.Sequential(TokenLinear(dim, ff), nn.GELU(), TokenLinear(ff, dim))

    def forward(self, x: torch.Tensor, memory: PrototypeMemory) -> torch.Tensor:
        x = x + self.attn(self.n1(x))
        x = x + self.from_proto(memory.attend(self.to_query(self.n2(x)), torch.exp(self.log_scale)))
        return x + self.mlp(self.n3(x))


class MaskedPredictor(nn.Module):
    """Patch features [N,P,C] -> predicted features [N,P,C], each patch predicted while masked."""

    def __init__(self, feat_dim: int, n_tokens: int, cfg: CrossClassConfig, masks: torch.Tensor):
        super().__init__()
        d = cfg.dim
        self.embed = TokenLinear(feat_dim, d)
        self.pos = nn.Parameter(torch.randn(1, n_tokens, d) * 0.02)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, d))
        self.blocks = nn.ModuleList([PredictorLayer(d, cfg.heads, cfg.ff, feat_dim) for _ in range(cfg.layers)])
        self.norm = nn.LayerNorm(d)
        self.predict = TokenLinear(d, feat_dim)
        self.register_buffer("masks", masks.view(masks.shape[0], 1, -1, 1), persistent=False)  # [G,1,P,1]

    def forward(self, tokens: torch.Tensor, memory: PrototypeMemory, group: int | None = None) -> torch.Tensor:
        """tokens [N,P,C] -> predictions [N,P,C]. ``group``: only that mask's copy (training: 1/G of the cost;
        the prediction is then valid where ``masks[group]`` is 1)."""
        p = int(tokens.shape[1])
        masks = self.masks if group is None else self.masks[group:group + 1]
        x = self.embed(tokens).unsqueeze(0)  # [1,N,P,d]
        x = x * (1.0 - masks) + self.mask_token * masks + self.pos  # [G,N,P,d]
        x = x.reshape(-1, p, x.shape[-1])  # [G*N,P,d]
        for blk in self.blocks:
            x = blk(x, memory)
        pred = self.predict(self.norm(x)).reshape(masks.shape[0], -1, p, tokens.shape[-1])  # [G,N,P,C]
        return torch.sum(pred * masks, dim=0)  # each patch from the copy in which it was masked


# ----------------------------------------------------------------------------- model
class CrossClass(FrozenPatchFeatures, AnomalyModel):
    """Frozen Lite tokens -> masked prediction guided by class prototypes; error + prototype distance maps."""

    family = "crossclass"
    map_names = ("prediction_error", "prototype_distance")
    export_policy = ExportPolicy(fp16_parts=(), int8_keep_fp32=("/head/", "/memory/", "/predictor/"))
    config_class = CrossClassConfig
    # --steps counts episodes: 300 is the schedule of every measured result (docs/crossclass.md); batch is not read
    default_schedule = (300, 1)
    extra_output_meanings = {FEATURES_OUTPUT: "float32 [N,C,h,w], locally averaged patch features "
                                              "(field calibration fits the prototypes from them)"}

    def __init__(self, cfg: CrossClassConfig):
        grid, features = self.frozen_lite(cfg, (8, 16))
        super().__init__(cfg, grid)
        self.features = features
        self.channels = self.features.channels
        self.memory = PrototypeMemory(cfg.prototypes, self.channels)
        self.predictor = MaskedPredictor(self.channels, grid[0] * grid[1], cfg, mask_groups(grid, cfg.mask_groups))
        self._feats: torch.Tensor | None = None

    def maps_from_features(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f [N,C,h,w] -> (raw maps [N,2,h,w], predicted features [N,P,C])."""
        c, h, w = (int(v) for v in f.shape[1:])
        tokens = f.reshape(-1, c, h * w).transpose(1, 2)  # [N,P,C]; batch as -1: the graph takes any batch
        pred = self.predictor(tokens, self.memory)
        err = torch.mean((pred - tokens) ** 2, dim=-1)
        dist = self.memory.distance(tokens)
        return torch.stack([err, dist], 1).reshape(-1, 2, h, w), pred

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        f = self.patch_features(x)
        self._feats = f  # handed to extra_outputs: the graph runs the backbone once
        return self.maps_from_features(f)[0], None

    # -- the hooks export and calibration read --------------------------------------
    def extra_calibration_buffers(self) -> list[tuple[str, str]]:
        return [("memory", PROTOTYPES_INITIALIZER)]

    def family_params(self) -> dict:
        cfg = self.cfg
        return {"memory": {"initializer": PROTOTYPES_INITIALIZER, "features_output": FEATURES_OUTPUT,
                           "capacity": cfg.prototypes, "dim": self.channels, "method": "kmeans",
                           "iterations": cfg.kmeans_iters, "seed": 0}}

    def set_prototypes(self, centres: np.ndarray) -> None:
        """centres: float32 [M,C], M <= K (k-means centres)."""
        self.memory.prototypes.copy_(torch.from_numpy(memory_matrix(centres, self.cfg.prototypes)))

    # -- training ----------------------------------------------------------------------
    def fit(self, fit_frames, val_frames, train_cfg, device: str) -> dict:
        return fit_crossclass(self, fit_frames, train_cfg, device)


def prototype_sets(feats: np.ndarray, cfg: CrossClassConfig, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image indices used, centres [K,C]) for ``cfg.proto_sets`` random subsets of one class's images."""
    n = len(feats)
    lo, hi = min(cfg.proto_images[0], n), min(cfg.proto_images[1], n)
    out = []
    for s in range(cfg.proto_sets):
        k = int(rng.integers(lo, hi + 1))
        idx = np.sort(rng.choice(n, size=k, replace=False))
        out.append((idx, kmeans(patches(feats[idx]), cfg.prototypes, cfg.kmeans_iters, seed=int(rng.integers(1 << 30)))))
    return out


def episode_loss(model: CrossClass, tokens: torch.Tensor, group: int, var: float, count: int,
                 share: BatchShare | None = None) -> torch.Tensor:
    """Normalized squared error of the features masked by ``group``, tokens [n,P,C] of an episode of
    ``count`` images (a mean over the episode; ``share``: this rank's rows of it under DDP)."""
    pred = model.predictor(tokens, model.memory, group)
    m = model.predictor.masks[group, 0, :, 0]
    return mean_loss_sum(torch.mean((pred - tokens) ** 2, dim=-1) * m, m.sum() * count * var, share)


def fit_crossclass(model: CrossClass, fit_frames: np.ndarray, train_cfg, device: str) -> dict:
    """Episodic training over the classes of ``model.train_classes`` (one class when unset).

    Under torchrun each rank extracts its share of the frozen features and all gather them; every rank
    then holds the same features, prototype sets and seeded generator, so it draws the
    same episode (class, prototype set, images, flips, mask group: checked each step) and trains on its rows
    of the episode's images; DDP averages the gradients, the loss is the episode mean (``mean_loss_sum``).
    The global batch is ``episode_batch`` (``--batch-size`` is not read). Rank 0 alone computes the deployed
    prototypes."""
    ctx = distributed.context()
    cfg = model.cfg
    t0 = time.perf_counter()
    labels = model.train_classes or ["all"] * len(fit_frames)
    if len(labels) != len(fit_frames):
        raise ValueError(f"{len(labels)} class labels for {len(fit_frames)} training images")
    lo, hi = distributed.shard_range(len(fit_frames), ctx, EXTRACT_BATCH)  # this rank's share of the features
    part = model.extract(fit_frames[lo:hi], device, EXTRACT_BATCH) if hi > lo else None
    feats = distributed.gather_shards(part, ctx)
    rng = np.random.default_rng(train_cfg.seed)
    classes = sorted(set(labels))
    per_class = {}
    for c in tqdm(classes, desc="class prototypes", leave=False, disable=not ctx.is_main):
        idx = np.array([i for i, l in enumerate(labels) if l == c])
        f = feats[idx]
        per_class[c] = (f, prototype_sets(f, cfg, rng), float(f.var()) + 1e-6)
    t1 = time.perf_counter()
    opt = torch.optim.AdamW(model.predictor.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps = int(train_cfg.steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(steps, 1), pct_start=0.1)
    loss_fn = distributed.wrap(distributed.LossModule(episode_loss, model), ctx)
    history, episodes = [], dict.fromkeys(classes, 0)
    groups = int(model.predictor.masks.shape[0])
    model.predictor.train()
    bar = tqdm(range(steps), desc="episodes", disable=steps < 20 or not ctx.is_main)
    for step in bar:
        ci = int(rng.integers(len(classes)))
        c = classes[ci]
        episodes[c] += 1
        f, sets, var = per_class[c]
        si = int(rng.integers(len(sets)))
        used, centres = sets[si]
        rest = np.setdiff1d(np.arange(len(f)), used)
        pool = rest if len(rest) >= cfg.episode_batch else np.arange(len(f))
        pick = rng.choice(pool, size=min(cfg.episode_batch, len(pool)), replace=False)
        share = distributed.share_of(len(pick), ctx, uneven=True)  # the class may hold fewer than episode_batch
        x = torch.from_numpy(f[pick if share is None else share.rows(pick)]).to(device)
        flip_w, flip_h = rng.random() < 0.5, rng.random() < 0.5
        if flip_w:
            x = torch.flip(x, dims=(3,))
        if flip_h:
            x = torch.flip(x, dims=(2,))
        model.set_prototypes(centres)
        tokens = x.flatten(2).transpose(1, 2)  # training only (eager)
        g = int(rng.integers(groups))  # one mask per episode: each patch is predicted while masked
        distributed.check_same_on_all_ranks([ci, si, g, len(pick), int(pick.sum()), int(flip_w), int(flip_h)], ctx,
                                            f"episode {step} (class, prototype set, mask group, images, flips)")
        loss = loss_fn(tokens, g, var, len(pick), share)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.predictor.parameters(), 1.0)  # of the rank-averaged gradient
        opt.step()
        sched.step()
        if step % 10 == 0 or step == steps - 1:
            lv = float(distributed.mean_across(loss, ctx))
            history.append({"step": step, "loss": lv, "class": c})
            bar.set_postfix(loss=f"{lv:.4f}")
    model.predictor.eval()
    if ctx.is_main:  # deployed prototypes until onboarding replaces them: k-means of every training patch
        model.set_prototypes(kmeans(patches(feats), cfg.prototypes, cfg.kmeans_iters, seed=train_cfg.seed))
    t2 = time.perf_counter()
    log.info("crossclass: %d classes, %d episodes; features+prototypes %.1fs, training %.1fs",
             len(classes), steps, t1 - t0, t2 - t1)
    return {"train_seconds": t2 - t0, "feature_seconds": t1 - t0, "steps_done": steps, "classes": classes,
            "episodes_per_class": episodes, "history": history}


# ----------------------------------------------------------------------------- registered models
@register_model
def crossclass_lite(image_size=256, **kw) -> CrossClass:
    """Lite2 stages 2+3 on a stride-8 grid, 2-layer masked predictor (width 128), 512 k-means prototypes."""
    return build_on_lite(CrossClass, "crossclass_lite", image_size, "lite2", **kw)


__all__ = ["CrossClass", "CrossClassConfig", "PrototypeMemory", "mask_groups"]
