"""EfficientAD (Batzner et al., WACV 2024) with the PUAD score (Sugawara et al., 2024).

Pieces, in the order of the paper:

- teacher: frozen network whose features define "normal". The paper distils a PDN
  from WideResNet-101 on ImageNet; neither is obtainable here, so the teacher is the frozen
  ImageNet EfficientNet-Lite trunk (``LiteTeacher``, Lite2 by default). An untrained ``PDN``
  teacher exists only to time the paper's network shape (no distillation: no ImageNet);
- student: PDN that predicts the teacher (first C channels) and the autoencoder (last C);
- autoencoder: sees the whole image through a 1x1 bottleneck, so it models the layout;
- map normalization: quantiles q_a/q_b of both maps on held-out good images -> 0/0.1;
- PUAD: Mahalanobis distance of globally pooled student features to a Gaussian of good
  images catches "unpicturable" (logical) anomalies; both scores are z-normalized on
  good images and mixed with weight w; the Gaussian score counts only beyond a gate
  (z_u > 2 by default), so it adds no noise to ordinary parts.

``EfficientAD.forward`` is the deployed graph: it takes raw uint8 NHWC frames in the
colour order of the artifact and returns every output the runtime knows
(``runtime.artifact.OUTPUT_MEANINGS``). All decision constants are buffers with the
names calibration rewrites (``runtime.artifact.CALIBRATION_INITIALIZERS``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


# ----------------------------------------------------------------------------- blocks
class _ConvStack(nn.Module):
    """A network that is one ``self.net`` Sequential ending in a conv (``head``)."""

    net: nn.Sequential

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before the last conv, for ``head_channels``."""
        return self.net[:-1](x)

    @property
    def head(self) -> nn.Conv2d:
        return self.net[-1]


class PDN(_ConvStack):
    """Patch description network, sizes "s" and "m" exactly as in the paper (no padding).

    [N,3,256,256] -> [N,out_channels,56,56]; receptive field 33 px.
    """

    def __init__(self, size: str = "s", out_channels: int = 384, padding: bool = False):
        super().__init__()
        p = 1 if padding else 0
        if size == "s":
            self.net = nn.Sequential(
                nn.Conv2d(3, 128, 4, padding=3 * p), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=p),
                nn.Conv2d(128, 256, 4, padding=3 * p), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=p),
                nn.Conv2d(256, 256, 3, padding=p), nn.ReLU(inplace=True),
                nn.Conv2d(256, out_channels, 4),
            )
        elif size == "m":
            self.net = nn.Sequential(
                nn.Conv2d(3, 256, 4, padding=3 * p), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=p),
                nn.Conv2d(256, 512, 4, padding=3 * p), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=p),
                nn.Conv2d(512, 512, 1), nn.ReLU(inplace=True),
                nn.Conv2d(512, 512, 3, padding=p), nn.ReLU(inplace=True),
                nn.Conv2d(512, out_channels, 4), nn.ReLU(inplace=True),
                nn.Conv2d(out_channels, out_channels, 1),
            )
        else:
            raise ValueError(f"PDN size {size!r}: choose s or m")


def _strided_layers(width: int) -> list[nn.Module]:
    """The real-time students' conv trunk: three stride-2 convs (first two = the stride-4 part), two 3x3."""
    w = width
    return [
        nn.Conv2d(3, w // 4, 4, 2, 1), nn.ReLU(inplace=True),
        nn.Conv2d(w // 4, w // 2, 4, 2, 1), nn.ReLU(inplace=True),
        nn.Conv2d(w // 2, w, 4, 2, 1), nn.ReLU(inplace=True),
        nn.Conv2d(w, w, 3, 1, 1), nn.ReLU(inplace=True),
        nn.Conv2d(w, w, 3, 1, 1), nn.ReLU(inplace=True),
    ]


class StridedStudent(_ConvStack):
    """Cheap student for the real-time variant: stride 8, padded, ~0.6 GMAC at 256x256.

    [N,3,H,W] -> [N,out_channels,H/8,W/8]; receptive field ~60 px.
    """

    def __init__(self, out_channels: int, width: int = 128):
        super().__init__()
        self.net = nn.Sequential(*_strided_layers(width), nn.Conv2d(width, out_channels, 1))


class FineStudent(nn.Module):
    """Stride-4 student: the stride-8 trunk, upsampled and fused with its own stride-4 layer.

    A plain stride-4 conv stack has too small a receptive field to predict the teacher's
    stride-16 stage (bottle, 1500 x 8 steps: student-teacher map alone image AUROC 0.92).
    Here the deep path keeps the stride-8 student's ~60 px field and the skip adds
    stride-4 detail, so the map is 64x64 at 256 px for a 3x3 conv at full rate.
    [N,3,H,W] -> [N,out_channels,H/4,W/4].
    """

    def __init__(self, out_channels: int, width: int = 128):
        super().__init__()
        w = width
        layers = _strided_layers(w)
        self.stem = nn.Sequential(*layers[:4])  # stride 4, w/2 channels
        self.deep = nn.Sequential(*layers[4:])  # stride 8, w channels
        self.fuse = nn.Sequential(nn.Conv2d(w + w // 2, w // 2, 3, 1, 1), nn.ReLU(inplace=True))
        self.head = nn.Conv2d(w // 2, out_channels, 1)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        fine = self.stem(x)
        deep = F.interpolate(self.deep(fine), size=fine.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([deep, fine], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def head_channels(student: nn.Module, features: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Output channels lo:hi of ``student.head`` on ``student.trunk`` features.

    Training uses only one half of the student's output per input (teacher half for the
    image and the penalty image, autoencoder half for the augmented image); computing
    just that half is exact and halves the largest tensors of a training step.
    """
    h = student.head
    return F.conv2d(features, h.weight[lo:hi], None if h.bias is None else h.bias[lo:hi], h.stride, h.padding)


class AutoEncoder(nn.Module):
    """EfficientAD autoencoder: 6 strided convs to a 64-d code, then upsample+conv back up.

    ``decoder_sizes`` are the bilinear upsampling sizes before each decoder conv; the
    paper uses (3, 8, 15, 32, 63, 127) for 256 inputs. A shorter list is cheaper.
    Input [N,3,H,W] -> [N,out_channels,*out_size].
    """

    def __init__(self, out_channels: int, out_size: tuple[int, int], decoder_sizes=(3, 8, 15, 32, 63, 127),
                 image_size: int = 256):
        super().__init__()
        self.out_size = tuple(out_size)
        self.decoder_sizes = tuple(round(s * image_size / 256) for s in decoder_sizes)
        code_kernel = max(1, image_size // 32)
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 32, 4, 2, 1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 4, 2, 1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, 4, 2, 1), nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, 4, 2, 1), nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, code_kernel),
        )
        self.decoder_convs = nn.ModuleList(nn.Conv2d(64, 64, 4, 1, 2) for _ in self.decoder_sizes)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Sequential(
            nn.Conv2d(64, 64, 3, 1, 1), nn.ReLU(inplace=True),
            nn.Conv2d(64, out_channels, 3, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        for size, conv in zip(self.decoder_sizes, self.decoder_convs):
            z = F.interpolate(z, size=(size, size), mode="bilinear", align_corners=False)
            z = self.dropout(F.relu(conv(z)))
        z = F.interpolate(z, size=self.out_size, mode="bilinear", align_corners=False)
        return self.head(z)


class LiteTeacher(nn.Module):
    """Frozen ImageNet EfficientNet-Lite trunk: chosen stages, resized to one grid, locally averaged (3x3 default).

    Local averaging (as in PatchCore) makes each vector describe a small neighbourhood.
    [N,3,H,W] (normalized for the Lite weights) -> [N,C,*out_size].
    """

    def __init__(self, backbone: str = "efficientnet_lite0", out_indices=(2, 3), out_size=(32, 32),
                 pretrained: bool = True, pool: int = 3):
        super().__init__()
        import timm

        if pretrained:
            from ..backbone import create_feature_extractor

            self.body = create_feature_extractor(backbone, tuple(out_indices))
        else:  # tests of export plumbing may skip the weights
            self.body = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=tuple(out_indices))
        self.out_size = tuple(out_size)
        if pool < 1 or pool % 2 == 0:
            raise ValueError(f"teacher pooling window {pool}: choose an odd size (1 = off)")
        self.pool = int(pool)
        self.channels = int(sum(self.body.feature_info.channels()))
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):  # always frozen, BN in eval mode
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = torch.cat([F.interpolate(f, size=self.out_size, mode="bilinear", align_corners=False)
                           for f in self.body(x)], 1)
        if self.pool == 1:
            return feats
        return F.avg_pool2d(feats, self.pool, 1, self.pool // 2, count_include_pad=False)


class MapSmoothing(nn.Module):
    """Separable Gaussian blur of the low-resolution anomaly map (reflect padding).

    Anomaly maps from patch features are noisy at the grid scale; smoothing before the
    upsampling raises localization metrics (the PatchCore recipe), at a fraction of the
    cost of blurring the full-resolution map. Linear and constant-preserving, so it
    commutes with the quantile normalization. ``sigma`` in grid cells; 0 = identity.
    """

    def __init__(self, sigma: float, grid: tuple[int, int]):
        super().__init__()
        self.sigma = float(sigma)
        radius = min(int(round(3 * self.sigma)), min(grid) - 1) if self.sigma > 0 else 0
        self.radius = radius
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        g = torch.exp(-x * x / (2 * max(self.sigma, 1e-6) ** 2))
        self.register_buffer("kernel", (g / g.sum()).view(1, 1, 1, -1), persistent=False)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        if self.radius == 0:
            return m
        r = self.radius
        m = F.pad(m, (r, r, r, r), mode="reflect")
        m = F.conv2d(m, self.kernel)
        return F.conv2d(m, self.kernel.transpose(2, 3))


# ----------------------------------------------------------------------------- config
@dataclass
class EfficientADConfig:
    """Everything needed to rebuild the network from a checkpoint (stored in it as JSON)."""

    name: str = "efficientad_lite"
    image_size: int = 256
    teacher: str = "lite2"  # "lite0"/"lite2" (frozen pretrained EfficientNet-Lite) or "pdn_s"/"pdn_m" (PDN)
    teacher_channels: int = 384  # for PDN teachers; Lite teachers report their own
    teacher_out_indices: tuple[int, ...] = (2, 3)
    teacher_pool: int = 3  # local averaging window of Lite teacher features, in grid cells (1 = off)
    student: str = "strided"  # "s", "m" (paper PDNs) or "strided" (real-time)
    student_width: int = 128
    student_stride: int = 8  # real-time student: 8 (StridedStudent, 32x32 map at 256 px) or 4 (FineStudent, 64x64)
    decoder_sizes: tuple[int, ...] = (3, 8, 15, 32)
    map_blur_px: float = 8.0  # Gaussian sigma of the anomaly-map smoothing, in input pixels at 256 px (0 = off)
    color_order: str = "BGR"  # of the uint8 frames the deployed graph takes
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # RGB on [0,1], matching the Lite weights
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    pretrained: bool = True
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EfficientADConfig":
        d = dict(d)
        d.setdefault("map_blur_px", 0.0)  # checkpoints written before smoothing existed had none
        for k in ("teacher_out_indices", "decoder_sizes", "mean", "std"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def _grid(cfg: EfficientADConfig) -> tuple[int, int]:
    """Output grid of teacher/student/AE for the configured input size."""
    if cfg.student == "strided":
        return cfg.image_size // cfg.student_stride, cfg.image_size // cfg.student_stride
    s = cfg.image_size
    # PDN without padding: conv4 -> pool2 -> conv4 -> pool2 -> conv3 -> conv4
    s = ((s - 3) // 2 - 3) // 2 - 2 - 3
    return s, s


# ----------------------------------------------------------------------------- model
class EfficientAD(nn.Module):
    """Teacher + student + autoencoder, map normalization and the PUAD Gaussian, in one graph."""

    def __init__(self, cfg: EfficientADConfig):
        super().__init__()
        self.cfg = cfg
        grid = _grid(cfg)
        self.grid = grid
        if cfg.teacher in ("lite0", "lite2"):
            self.teacher = LiteTeacher(f"efficientnet_{cfg.teacher}", cfg.teacher_out_indices, grid,
                                       pretrained=cfg.pretrained, pool=cfg.teacher_pool)
            c = self.teacher.channels
        elif cfg.teacher in ("pdn_s", "pdn_m"):
            if cfg.student == "strided":
                raise ValueError("a PDN teacher needs a PDN student (s or m): their grids must match")
            c = cfg.teacher_channels
            self.teacher = PDN(cfg.teacher[-1], c)
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        else:
            raise ValueError(f"teacher {cfg.teacher!r}: choose lite0, lite2, pdn_s or pdn_m")
        self.channels = c
        if cfg.student == "strided":
            if cfg.student_stride not in (4, 8):
                raise ValueError(f"student stride {cfg.student_stride}: choose 4 or 8")
            if cfg.student_width < 4:  # its first conv has width // 4 channels
                raise ValueError(f"student width {cfg.student_width}: choose 4 or more (default 128)")
            student = StridedStudent if cfg.student_stride == 8 else FineStudent
            self.student = student(2 * c, cfg.student_width)
            self.map_pad = 0
        elif cfg.student in ("s", "m"):
            self.student = PDN(cfg.student, 2 * c)
            self.map_pad = 4  # unpadded PDN output is 4 px short of the image border on every side (scaled)
        else:
            raise ValueError(f"student {cfg.student!r}: choose s, m or strided")
        self.autoencoder = AutoEncoder(c, grid, cfg.decoder_sizes, cfg.image_size)
        rgb_index = [2, 1, 0] if cfg.color_order == "BGR" else [0, 1, 2]
        self.register_buffer("channel_index", torch.tensor(rgb_index), persistent=False)
        self.register_buffer("input_mean", torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("input_std", torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        # teacher feature normalization (fit on training images before training)
        self.register_buffer("teacher_mean", torch.zeros(1, c, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, c, 1, 1))
        # calibration constants (names = runtime.artifact.CALIBRATION_INITIALIZERS)
        for name in ("st_scale", "ae_scale"):
            self.register_buffer(name, torch.tensor(1.0))
        for name in ("st_shift", "ae_shift"):
            self.register_buffer(name, torch.tensor(0.0))
        self.register_buffer("gaussian_mean", torch.zeros(c))
        self.register_buffer("gaussian_whitener", torch.eye(c))
        self.register_buffer("score_center", torch.zeros(2))
        self.register_buffer("score_weight", torch.tensor([0.5, 0.5]))
        self.register_buffer("calibrated", torch.tensor(False))
        self.set_map_smoothing(cfg.map_blur_px)

    # -- pieces used by training -------------------------------------------------
    def to_rgb(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [N,H,W,3] in cfg.color_order -> float [N,3,H,W] RGB on [0,255]."""
        x = frames.to(self.input_mean.dtype).permute(0, 3, 1, 2)
        return torch.index_select(x, 1, self.channel_index)

    def normalize(self, rgb: torch.Tensor) -> torch.Tensor:
        """float RGB [N,3,H,W] on [0,255] -> network input (mean/std of the Lite weights)."""
        return (rgb - self.input_mean) / self.input_std

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [N,H,W,3] in cfg.color_order -> float [N,3,H,W] RGB, mean/std normalized."""
        return self.normalize(self.to_rgb(frames))

    def teacher_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized teacher features [N,C,h,w] (channel-wise z-score over training images)."""
        with torch.no_grad():
            return (self.teacher(x.to(_dtype(self.teacher))).float() - self.teacher_mean) / self.teacher_std

    def half_networks(self, parts: tuple[str, ...] = ("teacher", "student", "autoencoder")) -> "EfficientAD":
        """fp16 for the named networks; pre/post-processing and statistics stay fp32."""
        for name in parts:
            getattr(self, name).half()
        return self

    def raw_maps(self, x: torch.Tensor):
        """x: preprocessed [N,3,H,W] -> (map_st [N,1,h,w], map_ae [N,1,h,w], pooled [N,C])."""
        c = self.channels
        # each network may run in fp16 (half_networks); maps and statistics stay fp32
        t = self.teacher_features(x)
        s = self.student(x.to(_dtype(self.student))).float()
        a = self.autoencoder(x.to(_dtype(self.autoencoder))).float()
        map_st = torch.mean((t - s[:, :c]) ** 2, dim=1, keepdim=True)
        map_ae = torch.mean((a - s[:, c:]) ** 2, dim=1, keepdim=True)
        pooled = torch.mean(s[:, :c], dim=(2, 3))
        return map_st, map_ae, pooled

    # -- the deployed graph ----------------------------------------------------
    def forward(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """frames: uint8 [N,H,W,3] (cfg.color_order, cfg.image_size) -> every deployed output."""
        map_st, map_ae, pooled = self.raw_maps(self.preprocess(frames))
        return self.decide(map_st, map_ae, pooled, (frames.shape[1], frames.shape[2]))

    def decide(self, map_st: torch.Tensor, map_ae: torch.Tensor, pooled: torch.Tensor,
               out_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Everything after the networks: map normalization, smoothing, upsampling, PUAD scores.

        Split from ``forward`` so that calibration and the smoothing choice can re-score stored
        network outputs under new constants without running the networks again."""
        norm = (map_st * self.st_scale + self.st_shift) + (map_ae * self.ae_scale + self.ae_shift)
        norm = self.map_smoothing(norm)
        picturable = torch.amax(norm, dim=(1, 2, 3))
        if self.map_pad:
            pad = round(self.map_pad * self.cfg.image_size / 256)
            norm = F.pad(norm, (pad, pad, pad, pad))
        anomaly_map = F.interpolate(norm, size=out_hw, mode="bilinear", align_corners=False)
        z = torch.matmul(pooled - self.gaussian_mean, self.gaussian_whitener)
        unpicturable = torch.sqrt(torch.sum(z * z, dim=1) + 1e-12)
        both = torch.stack([picturable, unpicturable], dim=1)
        d = (both - self.score_center) * self.score_weight  # gated PUAD sum, see calibration.fitting.score_constants
        image_score = d[:, 0] + torch.relu(d[:, 1])
        return {
            "anomaly_map": anomaly_map,
            "picturable_score": picturable,
            "unpicturable_score": unpicturable,
            "image_score": image_score,
            "features": pooled,
            "map_st_raw": map_st,
            "map_ae_raw": map_ae,
        }

    def set_map_smoothing(self, blur_px: float) -> None:
        """Smoothing sigma in input pixels at the 256 px reference scale (0 = off); kept in cfg.

        The map grid covers the image about uniformly, so pixels convert to grid cells by
        the grid-to-256 ratio. Re-calibrate afterwards: the image score depends on it.
        """
        self.cfg.map_blur_px = float(blur_px)
        self.map_smoothing = MapSmoothing(blur_px * self.grid[0] / 256, self.grid).to(self.input_mean.device)

    # -- constants -------------------------------------------------------------
    def set_calibration(self, st_scale, st_shift, ae_scale, ae_shift, gaussian_mean, gaussian_whitener,
                        score_center, score_weight) -> None:
        """Write all decision constants at once (floats / array-likes, any dtype)."""
        self.set_map_normalization(st_scale, st_shift, ae_scale, ae_shift)
        self._write_constants(gaussian_mean=gaussian_mean, gaussian_whitener=gaussian_whitener,
                              score_center=score_center, score_weight=score_weight)
        self.calibrated.fill_(True)

    def set_map_normalization(self, st_scale, st_shift, ae_scale, ae_shift) -> None:
        """Only the map affine (q_a/q_b); enough to score maps before the full calibration."""
        self._write_constants(st_scale=st_scale, st_shift=st_shift, ae_scale=ae_scale, ae_shift=ae_shift)

    def _write_constants(self, **vals) -> None:
        for k, v in vals.items():
            buf = getattr(self, k)
            buf.copy_(torch.as_tensor(v, dtype=buf.dtype, device=buf.device).reshape(buf.shape))


OUTPUT_NAMES = ("anomaly_map", "picturable_score", "unpicturable_score", "image_score", "features",
                "map_st_raw", "map_ae_raw")


# ----------------------------------------------------------------------------- registered models
@register_model
def efficientad_lite(image_size: int = 256, **kw) -> EfficientAD:
    """Real-time variant: frozen EfficientNet-Lite2 teacher (stride 8), strided student, short AE.

    Lite2 over Lite0: bottle image AUROC 0.994 vs 0.981 (benchmarks/results/accuracy_bottle_lite*.json)."""
    return EfficientAD(EfficientADConfig(name="efficientad_lite", image_size=image_size, **kw))


@register_model
def efficientad_s(image_size: int = 256, teacher: str = "pdn_s", **kw) -> EfficientAD:
    """Paper EfficientAD-S: PDN-S teacher and student, full autoencoder (76 GFLOP at 256)."""
    return EfficientAD(EfficientADConfig(name="efficientad_s", image_size=image_size, teacher=teacher, student="s",
                                         decoder_sizes=(3, 8, 15, 32, 63, 127), **kw))


@register_model
def efficientad_m(image_size: int = 256, teacher: str = "pdn_m", **kw) -> EfficientAD:
    """Paper EfficientAD-M: PDN-M teacher and student, full autoencoder."""
    return EfficientAD(EfficientADConfig(name="efficientad_m", image_size=image_size, teacher=teacher, student="m",
                                         decoder_sizes=(3, 8, 15, 32, 63, 127), **kw))


def build_from_config(cfg_dict: dict) -> EfficientAD:
    return EfficientAD(EfficientADConfig.from_dict(cfg_dict))
