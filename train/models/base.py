"""The model-family contract: what every family in ``train/models/`` provides.

A family is one file that defines a config dataclass, an ``AnomalyModel`` subclass and
registered builders. It provides only:

- ``raw(x)``: preprocessed images ``[N,3,H,W]`` -> (raw maps ``[N,K,h,w]``, pooled features
  ``[N,D]`` or None) -- its networks;
- ``fit(fit_frames, val_frames, train_cfg, device)``: its training (losses, optimizer, steps);
  returns a JSON-able dict for the checkpoint;
- class attributes ``family`` (its name), ``map_names`` (K names of its raw maps) and an
  ``ExportPolicy`` (which sub-networks may run in fp16 / be quantized).

Everything else is shared: the fused preprocessing (uint8 NHWC frames in the artifact's colour
order -> normalized float NCHW), the deploy head (``head.DeployHead``: normalization,
smoothing, upsampling, Gaussian, score mix), export, calibration, the runtime. Nothing outside
the family file names a family.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

import torch
from torch import nn

from .head import DeployHead


def parse_hw(size) -> tuple[int, int]:
    """An input size as (height, width): an int (square), [h, w], or text 'WxH' / 'N'."""
    if isinstance(size, str):
        t = size.lower().replace(" ", "")
        if "x" in t:
            w, h = t.split("x", 1)
            size = (int(h), int(w))
        else:
            size = int(t)
    if isinstance(size, int):
        size = (size, size)
    h, w = (int(v) for v in size)
    if h < 32 or w < 32 or h % 32 or w % 32:
        raise ValueError(f"input size {w}x{h} (WxH): give multiples of 32, at least 32 (e.g. 256 or 512x192)")
    return h, w


def size_for_aspect(aspect: float, side: int = 256) -> tuple[int, int]:
    """(height, width), multiples of 32, of about side**2 pixels at the given width/height aspect.

    Keeps the pixel budget (and so the speed) of a side x side square while keeping the part's
    shape; aspects within 10 % of square give exactly side x side.
    """
    if not aspect > 0:
        raise ValueError(f"aspect {aspect}: must be positive")
    if abs(aspect - 1.0) <= 0.1:
        return parse_hw(side)
    r = aspect ** 0.5
    w = max(32, int(round(side * r / 32)) * 32)
    h = max(32, int(round(side / r / 32)) * 32)
    return h, w


@dataclass
class ExportPolicy:
    """How a family's networks may be exported.

    fp16_parts: sub-module names that ``--fp16`` turns to fp16 (the head always stays fp32);
    int8_keep_fp32: substrings of ONNX node names that INT8 export leaves unquantized.
    """

    fp16_parts: tuple[str, ...] = ()
    int8_keep_fp32: tuple[str, ...] = ("/head/",)


@dataclass
class FamilyConfig:
    """Fields every family config has (families extend it). Stored in checkpoints as JSON."""

    name: str = ""
    image_size: tuple[int, int] = (256, 256)  # (height, width)
    color_order: str = "BGR"  # of the uint8 frames the deployed graph takes
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # RGB on [0,1]
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    map_blur_px: float = 8.0  # smoothing sigma, px at the 256 px reference (0 = off)
    # (dy, dx) input px by which the map is moved back at upsampling (``train.geometry``); None: measured when training starts
    map_offset_px: tuple[float, float] | None = (0.0, 0.0)
    pretrained: bool = True
    extra: dict = field(default_factory=dict)
    # fields added after checkpoints were written, with the value that reproduces those checkpoints (a new
    # default may differ: it is for new models, never silently for old ones)
    LEGACY_DEFAULTS: ClassVar[dict] = {}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FamilyConfig":
        d = dict(d)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"checkpoint config has unknown fields {unknown} for {cls.__name__}; "
                             "it was written by a newer edgead - upgrade edgead")
        for k, v in cls.LEGACY_DEFAULTS.items():
            d.setdefault(k, v)
        for k, v in list(d.items()):
            if isinstance(v, list):
                d[k] = tuple(v)
        d["image_size"] = parse_hw(d.get("image_size", 256))
        return cls(**d)

    @property
    def height(self) -> int:
        return self.image_size[0]

    @property
    def width(self) -> int:
        return self.image_size[1]


def build_on_lite(model_cls: type["AnomalyModel"], name: str, image_size, default_backbone: str,
                  **kw) -> "AnomalyModel":
    """A registered model of a family on a frozen ImageNet EfficientNet-Lite backbone: ``default_backbone``
    (lite0/lite2) and pretrained weights unless the caller says otherwise (``backbone=``, ``pretrained=``);
    the rest goes to the family's config."""
    kw.setdefault("pretrained", True)
    kw.setdefault("backbone", default_backbone)
    return model_cls(model_cls.config_class(name=name, image_size=parse_hw(image_size), **kw))


class AnomalyModel(nn.Module):
    """Base of every family: preprocessing + the family's ``raw`` + the shared ``DeployHead``."""

    family: str = ""
    map_names: tuple[str, ...] = ("map",)
    export_policy = ExportPolicy()
    config_class = FamilyConfig
    # the training schedule `python -m train` uses when --steps / --batch-size are not given: (steps, batch);
    # None = the EfficientAD paper's (70,000 steps at batch 1). Families whose training differs set their own.
    default_schedule: tuple[int, int] | None = None
    # True: default_schedule's steps are per trained class (a unified model sees every class as often as a
    # per-class model would: UniAD on 7 classes trains 7 x the steps)
    schedule_steps_per_class: bool = False
    # class name of each fit frame, set by the training loop before ``fit`` (families that train per class read it)
    train_classes: list[str] | None = None
    # set by ``fit`` of families whose scoring holds the training images themselves (a memory): raw outputs of
    # the fit frames, each scored out-of-sample ({"raw_maps": [N,K,h,w], "features": [N,D] when the head has
    # a Gaussian}); the first calibration then fits the head on them as well as on the validation images
    heldout_fit: dict | None = None

    def __init__(self, cfg: FamilyConfig, grid: tuple[int, int], feature_dim: int = 0, pad_cells: int = 0):
        super().__init__()
        self.cfg = cfg
        self.grid = (int(grid[0]), int(grid[1]))
        rgb_index = [2, 1, 0] if cfg.color_order == "BGR" else [0, 1, 2]
        self.register_buffer("channel_index", torch.tensor(rgb_index), persistent=False)
        self.register_buffer("input_mean", torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("input_std", torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("calibrated", torch.tensor(False))
        self.head = DeployHead(self.map_names, self.grid, feature_dim, cfg.map_blur_px, pad_cells,
                               cfg.map_offset_px or (0.0, 0.0))

    # -- preprocessing (fused into the graph) ------------------------------------
    def to_rgb(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [N,H,W,3] in cfg.color_order -> float [N,3,H,W] RGB on [0,255]."""
        x = frames.to(self.input_mean.dtype).permute(0, 3, 1, 2)
        return torch.index_select(x, 1, self.channel_index)

    def normalize(self, rgb: torch.Tensor) -> torch.Tensor:
        """float RGB [N,3,H,W] on [0,255] -> network input (mean/std of the backbone's weights)."""
        return (rgb - self.input_mean) / self.input_std

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.to_rgb(frames))

    # -- what a family provides ---------------------------------------------------
    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Preprocessed [N,3,H,W] -> (raw maps [N,K,h,w] fp32, pooled features [N,D] fp32 or None)."""
        raise NotImplementedError

    def fit(self, fit_frames, val_frames, train_cfg, device: str) -> dict:
        """Train on uint8 NHWC good frames (BGR); returns JSON-able training facts."""
        raise NotImplementedError

    def grid_features(self, x: torch.Tensor) -> torch.Tensor | None:
        """Preprocessed [N,3,H,W] -> the features [N,C,h,w] whose grid the raw maps live on, for measuring
        where each cell really sees (``train.geometry``); None: the family's map is drawn as it is."""
        return None

    def extra_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Optional family outputs (role 'raw') beside the head's, e.g. patch features for a memory."""
        return {}

    extra_output_meanings: dict[str, str] = {}

    def extra_calibration_buffers(self) -> list[tuple[str, str]]:
        """(module path, buffer name) pairs beyond the head's that calibration rewrites (e.g. a memory);
        export names each initializer after its buffer and lists it in the sidecar."""
        return []

    def family_params(self) -> dict:
        """JSON-able facts for the sidecar's ``family_params`` (opaque to the runtime; read by calibration
        by capability, e.g. ``memory``), beside the checkpoint config."""
        return {}

    # -- the deployed graph ---------------------------------------------------------
    def forward(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """frames: uint8 [N,H,W,3] (cfg.color_order, cfg.image_size) -> every deployed output."""
        x = self.preprocess(frames)
        maps, feats = self.raw(x)
        out = self.decide(maps, feats, (frames.shape[1], frames.shape[2]))
        out.update(self.extra_outputs(x))
        return out

    def decide(self, maps: torch.Tensor, features: torch.Tensor | None, out_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Everything after the networks (the shared head)."""
        return self.head(maps, features, out_hw)

    def output_names(self) -> tuple[str, ...]:
        return self.head.output_names + tuple(self.extra_output_meanings)

    def set_map_smoothing(self, blur_px: float) -> None:
        """Smoothing sigma in px at 256 px (0 = off), kept in cfg. Re-calibrate afterwards."""
        self.cfg.map_blur_px = float(blur_px)
        self.head.set_smoothing(blur_px)

    def set_map_offset(self, map_offset_px) -> None:
        """(dy, dx) in input px (``train.geometry.measure_grid_offset``), kept in cfg. Only the drawn map moves: scores
        are taken on the grid, so calibration stays valid."""
        self.cfg.map_offset_px = tuple(float(v) for v in map_offset_px)
        self.head.set_offset(self.cfg.map_offset_px)

    def half_networks(self, parts: tuple[str, ...] | None = None) -> "AnomalyModel":
        """fp16 for the named networks (default: the export policy's); head and statistics stay fp32."""
        for name in (self.export_policy.fp16_parts if parts is None else parts):
            getattr(self, name).half()
        return self

    def upgrade_state_dict(self, state: dict) -> dict:
        """Rename entries of checkpoints written by older edgead versions (families override)."""
        return state
