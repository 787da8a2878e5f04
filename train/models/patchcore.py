"""PatchCore-style memory bank (Roth et al., CVPR 2022) on frozen EfficientNet-Lite features.

Pieces, in the order of the paper:

- locally aware patch features: frozen ImageNet EfficientNet-Lite stages (2 and 3 by default: strides
  8 and 16), each resized to the stride-8 grid and averaged over 3x3 neighbourhoods (``LiteTeacher``,
  shared with EfficientAD-lite);
- memory: the greedy k-center coreset of the training images' patch features (exact distances by default;
  the paper's random projection is an option), ``calibration.memory.greedy_coreset`` -- the same
  numpy code field onboarding runs, so a memory refit in the field is the memory training builds;
- anomaly map: each patch's Euclidean distance to its nearest memory row: the row is found with one
  matrix product against the memory (``-2 a.b + ||b||^2``), the distance recomputed exactly from it;
- image score: the map maximum (the shared head: normalization, smoothing, upsampling, max), plus PUAD's gated
  Gaussian score (Sugawara et al., 2024) on the image-mean of the same patch features (``global_gaussian``):
  a nearest-patch distance cannot see a part that is missing, doubled or of the wrong kind when every patch
  looks normal on its own (logical anomalies); the mean feature of the image moves. The head's gate (2 standard
  deviations of good images) keeps it silent on ordinary parts. Costs one mean and one small matmul. By default
  ("auto") calibration switches it on only for good images with a layout and off for textures, where it hurt
  (``calibration.layout``: measured from the good images, the same at training and at every field refit).

"Training" is feature extraction + coreset: no gradient step. The memory is a fixed-capacity
buffer ``knn.memory_bank`` [C+1, M] (one column per item: features and squared norm, see
``calibration.memory``)
exported as the named initializer ``memory_bank``: ``python -m calibration fit`` replaces it
torch-free, which is how a new product is onboarded without re-export. PatchCore's reweighting by the
nearest item's neighbourhood (``reweight_neighbours``, off by default) is applied to every patch of the map,
so the shared head's max, normalization and threshold see it like any other map.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from calibration.layout import has_layout, layout_cells, layout_fraction, rolled_frames
from calibration.memory import MIN_IMAGES, MemorySpec, build_memory_for, fit_memory_with, memory_matrix

from .base import AnomalyModel, ExportPolicy, FamilyConfig, build_on_lite
from .efficientad import LiteTeacher
from .registry import register_model

log = logging.getLogger(__name__)

MEMORY_INITIALIZER = "memory_bank"
FEATURES_OUTPUT = "patch_features"


@dataclass
class PatchCoreConfig(FamilyConfig):
    """Everything needed to rebuild the model from a checkpoint (stored in it as JSON)."""

    name: str = "patchcore_lite"
    backbone: str = "lite2"  # frozen ImageNet EfficientNet-Lite: lite0 or lite2
    out_indices: tuple[int, ...] = (2, 3)  # stages (2: stride 8, 3: stride 16)
    stride: int = 8  # grid of the anomaly map, px per cell
    pool: int = 3  # local averaging window in grid cells (1 = off)
    memory_size: int = 2048  # capacity of the memory (rows); fixed in the exported graph
    coreset_ratio: float = 0.1  # fraction of the training patches kept (up to memory_size)
    # random projection for the coreset search (0 = exact distances, the default since 2026-12-02: 168 -> 128
    # dimensions saved little time and made the coreset depend on the projection's draw; grass 0.654..0.754
    # over five draws. Exact: painted validation +0.003 over 13 datasets; docs/memory_bank.md)
    projection_dim: int = 0
    coreset_seed: int = 0
    # 384 px, 2048 items, 8 px: chosen on defects painted on held-out GOOD images of bottle, screw and
    # transistor (never their test splits); docs/memory_bank.md has the curves
    map_blur_px: float = 8.0
    # None: measured when training starts (``train.geometry``; ~(11, 10) px for Lite2 stages 2+3 at stride 8, any
    # input size). Adopted on painted validation over 13 datasets: pixel AUROC 0.9915 -> 0.9955 and AUPRO 0.950 ->
    # 0.971, higher on 13 of 13 (``grid_offset_patchcore_lite_13datasets.json``, docs/memory_bank.md)
    map_offset_px: tuple[float, float] | None = None
    # PUAD's gated Gaussian on the image-mean patch feature, for logical anomalies. It lifts products with a layout
    # (tray 0.741 -> 0.928, real transistor 0.978 -> 0.994) but hurt busy natural textures (grass 0.654 -> 0.578;
    # test splits, reported not chosen). "auto": in the graph, switched on by calibration only for good images
    # with a layout (calibration.layout, decided from the good images alone); true: always; false: not in the graph
    global_gaussian: bool | str = "auto"
    # PatchCore's reweighting by the nearest item's neighbourhood in the memory (k items; 0 = off, the paper: 9).
    # Off: measured a no-op on these features (weights 0.995-1.000; docs/memory_bank.md)
    reweight_neighbours: int = 0
    # checkpoints from before each option: map only; the map upsampled without a grid offset
    LEGACY_DEFAULTS = {"global_gaussian": False, "map_offset_px": (0.0, 0.0)}

    def __post_init__(self):
        if self.global_gaussian not in (True, False, "auto"):
            raise ValueError(f"global_gaussian {self.global_gaussian!r}: choose auto, true or false")

    @property
    def gaussian_in_graph(self) -> bool:
        return self.global_gaussian in (True, "auto")


class NearestNeighbour(nn.Module):
    """Distance of each patch to its nearest memory row, as matrix products against ``memory_bank``.

    memory_bank: float32 [C+1(+k), M], columns ``[b, ||b||^2(, neighbour indices)]``. The nearest row is found
    with one MatMul, ``[-2a, 1(, 0...)] . [b, ||b||^2(, ...)] = ||a - b||^2 - ||a||^2``, whose only constant
    operand is the memory itself (stored in the layout MatMul reads, so the exporter has nothing on it to
    fold). That expanded form cancels in float32 (an error of about 1e-7 ||a||^2, which the square root
    magnifies for patches that lie on a memory item: 6e-2 between torch and ONNX Runtime on training
    patches), so the distance itself is recomputed directly, ``||a - b*||``, from the nearest column gathered
    from the same initializer: exact to float32 rounding of the distance, and the same in every engine.

    ``neighbours`` k > 0: PatchCore's reweighting (Roth et al., eq. 7), applied to every patch of the map:
    ``d* (1 - exp(d*) / sum_{m in N_k(b*)} exp(||a - m||))`` with N_k(b*) the k memory items nearest to b*
    (b* included; their indices ride in the gathered column, ``calibration.memory.item_neighbours``). A patch
    whose nearest item sits in a sparse region of the memory (a rare normal pattern, often a defect's
    nearest match) keeps its distance; one in a crowded region is damped by up to 1/k. k gathers of C values
    per patch: nothing next to the search's matmul.
    """

    def __init__(self, capacity: int, dim: int, neighbours: int = 0):
        super().__init__()
        if capacity < 1:
            raise ValueError(f"memory size {capacity}: choose at least 1 row")
        if neighbours < 0 or neighbours == 1:
            raise ValueError(f"reweight_neighbours {neighbours}: choose 0 (off) or at least 2 (PatchCore: 9)")
        self.neighbours = int(neighbours)
        self.register_buffer("memory_bank", torch.zeros(dim + 1 + self.neighbours, capacity))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [N,C,h,w] -> distances [N,1,h,w] (float32, >= 0)."""
        h, w = feats.shape[-2:]
        a = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])  # [P,C]; no Shape ops: any batch size
        if not self.neighbours:
            return torch.sqrt(nearest_squared_distance(a, self.memory_bank)).reshape(-1, 1, int(h), int(w))
        return reweighted_distance(a, self.memory_bank, self.neighbours).reshape(-1, 1, int(h), int(w))


def nearest_column(a: torch.Tensor, bank: torch.Tensor, extra_rows: int = 0) -> torch.Tensor:
    """a [P,C], bank [C+1+extra_rows, M] (columns ``[b, ||b||^2, ...]``) -> the nearest column of each patch,
    gathered whole from the initializer itself, [C+1+extra_rows, P].

    The search is one MatMul against the bank as it is stored, ``[-2a, 1, 0...] . column``: rows after the
    norm (neighbour indices) count for nothing. Callers slice the gathered columns, never the bank (a slice
    of a constant would be folded into a new, unnamed one)."""
    query = F.pad(-2.0 * a, (0, 1), value=1.0)
    if extra_rows:
        query = F.pad(query, (0, extra_rows), value=0.0)
    return torch.index_select(bank, 1, torch.argmin(torch.matmul(query, bank), dim=1))


def nearest_squared_distance(a: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """a [P,C], bank [C+1,M] (columns ``[b, ||b||^2]``) -> ``||a - b*||^2`` [P] for the nearest column b*.

    The distance is recomputed from the gathered column (see ``NearestNeighbour``). Shared by every graph
    that holds such a bank."""
    b = nearest_column(a, bank)[:a.shape[1]].t()  # [P,C]: the norm row dropped
    return torch.sum((a - b) ** 2, dim=1)


def reweighted_distance(a: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """a [P,C], bank [C+1+k,M] -> PatchCore's reweighted nearest distance [P] (see ``NearestNeighbour``)."""
    c = a.shape[1]
    col = nearest_column(a, bank, k)  # [C+1+k, P]
    d_star = torch.sqrt(torch.sum((a - col[:c].t()) ** 2, dim=1))  # [P]
    # [P*k]: N_k(b*), b* first; the clamp keeps any memory content a valid index (export traces with
    # placeholder values there, and a damaged refit must not crash a line)
    idx = torch.clamp(torch.round(col[c + 1:].t()), 0, bank.shape[1] - 1).to(torch.int64).reshape(-1)
    hood = torch.index_select(bank, 1, idx)[:c].t().reshape(-1, k, c)  # [P,k,C]
    d_hood = torch.sqrt(torch.sum((a.unsqueeze(1) - hood) ** 2, dim=2))  # [P,k]
    # exp(d*) / sum exp(d_j) = 1 / sum exp(d_j - d*); the clamp keeps a far neighbourhood finite (weight 1)
    ratio = 1.0 / torch.sum(torch.exp(torch.clamp(d_hood - d_star.unsqueeze(1), max=60.0)), dim=1)
    return d_star * (1.0 - ratio)


class FrozenPatchFeatures:
    """Mixin for families scored on frozen ``self.features`` patch features that also leave the graph as
    the ``patch_features`` output (what calibration refits their memory from): the backbone runs once."""

    _feats: torch.Tensor | None = None

    @staticmethod
    def frozen_lite(cfg, strides: tuple[int, ...]) -> tuple[tuple[int, int], LiteTeacher]:
        """Check ``cfg.backbone`` and ``cfg.stride`` (one of ``strides``); the feature grid and the frozen Lite
        trunk on it (assign it after ``AnomalyModel.__init__``)."""
        if cfg.backbone not in ("lite0", "lite2"):
            raise ValueError(f"backbone {cfg.backbone!r}: choose lite0 or lite2")
        if cfg.stride not in strides:
            choices = ", ".join(map(str, strides[:-1])) + f" or {strides[-1]}" if len(strides) > 1 else str(strides[0])
            raise ValueError(f"stride {cfg.stride}: choose {choices}")
        h, w = cfg.image_size
        grid = (h // cfg.stride, w // cfg.stride)
        return grid, LiteTeacher(f"efficientnet_{cfg.backbone}", cfg.out_indices, grid, pretrained=cfg.pretrained,
                                 pool=cfg.pool)

    def patch_features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed [N,3,H,W] -> locally averaged patch features [N,C,h,w] float32."""
        with torch.no_grad():
            return self.features(x).float()

    def grid_features(self, x: torch.Tensor) -> torch.Tensor:
        """The map's grid is the patch features' (``train.geometry``)."""
        return self.patch_features(x)

    def extra_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f, self._feats = self._feats, None  # set by the family's raw()
        return {FEATURES_OUTPUT: f if f is not None else self.patch_features(x)}

    @torch.no_grad()
    def extract(self, frames: np.ndarray, device: str, batch: int = 16) -> np.ndarray:
        """uint8 NHWC frames -> patch features float32 [N,C,h,w] (numpy)."""
        self.eval()
        out = []
        for i in tqdm(range(0, len(frames), batch), desc="patch features", leave=False):
            x = self.preprocess(torch.from_numpy(frames[i:i + batch]).to(device))
            out.append(self.patch_features(x).cpu().numpy())
        return np.concatenate(out)


class PatchCore(FrozenPatchFeatures, AnomalyModel):
    """Frozen Lite features -> nearest-neighbour distance to a memory of good patches."""

    family = "patchcore"
    map_names = ("nn_distance",)
    # the memory stays fp32 and unquantized: calibration rewrites it as a float initializer
    export_policy = ExportPolicy(fp16_parts=(), int8_keep_fp32=("/head/", "/knn/"))
    config_class = PatchCoreConfig
    extra_output_meanings = {FEATURES_OUTPUT: "float32 [N,C,h,w], locally averaged patch features "
                                              "(field calibration builds the memory from them)"}

    def __init__(self, cfg: PatchCoreConfig):
        grid, features = self.frozen_lite(cfg, (4, 8, 16))
        super().__init__(cfg, grid, feature_dim=features.channels if cfg.gaussian_in_graph else 0)
        self.features = features
        self.channels = self.features.channels
        self.knn = NearestNeighbour(cfg.memory_size, self.channels, cfg.reweight_neighbours)
        self._feats: torch.Tensor | None = None

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: preprocessed [N,3,H,W] -> (nearest-neighbour distance [N,1,h,w], image-mean feature [N,C] or None)."""
        f = self.patch_features(x)
        self._feats = f  # handed to extra_outputs, so the graph runs the backbone once
        return self.knn(f), (self.image_feature(f) if self.cfg.gaussian_in_graph else None)

    @staticmethod
    def image_feature(f: torch.Tensor) -> torch.Tensor:
        """Patch features [N,C,h,w] -> the image-mean feature [N,C] the optional Gaussian scores."""
        return torch.mean(f, dim=(2, 3))

    # -- the hooks export and calibration read --------------------------------------
    def extra_calibration_buffers(self) -> list[tuple[str, str]]:
        return [("knn", MEMORY_INITIALIZER)]

    def family_params(self) -> dict:
        cfg = self.cfg
        # a memory onboards from a few images; below what a Gaussian of this dimension needs, field
        # calibration switches the Gaussian score off (and says so) instead of refusing
        switch = "layout" if cfg.global_gaussian == "auto" else "always"
        gaussian = {"gaussian": {"optional": True, "switch": switch}} if cfg.gaussian_in_graph else {}
        return gaussian | {"memory": {"initializer": MEMORY_INITIALIZER, "features_output": FEATURES_OUTPUT,
                           "capacity": cfg.memory_size, "dim": self.channels, "coreset_ratio": cfg.coreset_ratio,
                           "projection_dim": cfg.projection_dim or None, "seed": cfg.coreset_seed,
                           "neighbours": cfg.reweight_neighbours}}

    # -- "training" -----------------------------------------------------------------
    def set_memory(self, rows: np.ndarray) -> None:
        """rows: float32 [C+1(+k), M] (``calibration.memory.memory_matrix``)."""
        buf = self.knn.memory_bank
        if tuple(rows.shape) != tuple(buf.shape):
            raise ValueError(f"memory of shape {list(rows.shape)}, the model holds {list(buf.shape)}")
        buf.copy_(torch.from_numpy(np.asarray(rows, np.float32)))

    def fit(self, fit_frames, val_frames, train_cfg, device: str) -> dict:
        """Patch features of the training frames -> greedy coreset -> memory (no gradient steps).

        The memory is built as a field refit builds it (``calibration.memory.fit_memory_with``): a memory of
        each half of the images also scores the other half, so the first calibration fits quantiles, score
        weights and threshold on maps of every training image taken out-of-sample (``heldout_fit``), not only
        on the few validation images (10 %: 6 of 60, too few for a score scale or a 1 % threshold)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        feats = self.extract(fit_frames, device)
        t1 = time.perf_counter()
        spec = MemorySpec.from_family_params(self.family_params())
        if len(feats) >= MIN_IMAGES:
            mf = fit_memory_with(spec, self._torch_scorer(device), feats, cfg.coreset_seed, deployed=False)
            rows, n = mf.constants[MEMORY_INITIALIZER], int(mf.info["rows"])
            self.heldout_fit = {"raw_maps": mf.heldout_raw_maps}
            if cfg.gaussian_in_graph:
                self.heldout_fit["features"] = self.image_feature(torch.from_numpy(feats)).numpy()
            if cfg.global_gaussian == "auto":
                rolled = self.extract(rolled_frames(fit_frames), device)
                self.heldout_fit["layout"] = layout_fraction(layout_cells(feats), layout_cells(rolled))
                log.info("layout: %.3f of the patch-feature variance is tied to position (Gaussian score %s)",
                         self.heldout_fit["layout"], "on" if has_layout(self.heldout_fit["layout"]) else "off")
        else:
            rows, n = build_memory_for(spec, feats)
        self.set_memory(rows)
        t2 = time.perf_counter()
        patches = int(feats.shape[0] * feats.shape[2] * feats.shape[3])
        log.info("memory: %d of %d patches (capacity %d); features %.1fs, coreset %.1fs",
                 n, patches, cfg.memory_size, t1 - t0, t2 - t1)
        return {"train_seconds": t2 - t0, "feature_seconds": t1 - t0, "coreset_seconds": t2 - t1,
                "memory_rows": n, "patches": patches, "steps_done": 0}

    def _torch_scorer(self, device: str):
        """``scorer(memory, features, batch) -> raw maps`` through this model's own nearest-neighbour search."""

        @torch.no_grad()
        def score(memory: np.ndarray, features: np.ndarray, batch: int) -> np.ndarray:
            self.set_memory(memory)
            out = [self.knn(torch.from_numpy(features[i:i + 64]).to(device)).cpu().numpy()
                   for i in range(0, len(features), 64)]  # the search is per patch: the batch changes nothing
            return np.concatenate(out)

        return score


# ----------------------------------------------------------------------------- registered models
@register_model
def patchcore_lite(image_size=384, **kw) -> PatchCore:
    """Memory bank on Lite2 stages 2+3 (168 channels), stride 8, 3x3 averaging, greedy coreset."""
    return build_on_lite(PatchCore, "patchcore_lite", image_size, "lite2", **kw)


@register_model
def patchcore_lite0(image_size=384, **kw) -> PatchCore:
    """The same on Lite0 (stages 2+3: 152 channels): a cheaper backbone."""
    return build_on_lite(PatchCore, "patchcore_lite0", image_size, "lite0", **kw)


__all__ = ["PatchCore", "PatchCoreConfig", "NearestNeighbour", "FrozenPatchFeatures", "nearest_column", "nearest_squared_distance", "memory_matrix"]
