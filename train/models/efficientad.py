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

The family provides its networks (``raw``: the student-teacher and student-autoencoder maps
and the pooled student features) and its training (``fit``, in ``efficientad_train.py``);
preprocessing, map normalization, smoothing, the Gaussian and the score mix are the shared
deploy head (``base.AnomalyModel``, ``head.DeployHead``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import AnomalyModel, ExportPolicy, FamilyConfig, parse_hw
from .head import MapSmoothing  # noqa: F401  (re-exported: older imports)
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
                 image_size: tuple[int, int] = (256, 256)):
        super().__init__()
        h, w = parse_hw(image_size)
        self.out_size = tuple(out_size)
        self.decoder_sizes = tuple((round(s * h / 256), round(s * w / 256)) for s in decoder_sizes)
        code_kernel = (max(1, h // 32), max(1, w // 32))
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
            z = F.interpolate(z, size=size, mode="bilinear", align_corners=False)
            z = self.dropout(F.relu(conv(z)))
        z = F.interpolate(z, size=self.out_size, mode="bilinear", align_corners=False)
        return self.head(z)


RESAMPLE_MODES = ("bilinear", "area")


class LiteTeacher(nn.Module):
    """Frozen ImageNet EfficientNet-Lite trunk: chosen stages, resized to one grid, locally averaged (3x3 default).

    Local averaging (as in PatchCore) makes each vector describe a small neighbourhood.
    [N,3,H,W] (normalized for the Lite weights) -> [N,C,*out_size].
    """

    def __init__(self, backbone: str = "efficientnet_lite0", out_indices=(2, 3), out_size=(32, 32),
                 pretrained: bool = True, pool: int = 3, resample: str = "bilinear"):
        super().__init__()
        if resample not in RESAMPLE_MODES:
            raise ValueError(f"feature resampling {resample!r}: choose one of {', '.join(RESAMPLE_MODES)}")
        self.resample = resample
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
        return self.local_average(self.grid_features(x))

    def grid_features(self, x: torch.Tensor) -> torch.Tensor:
        """The chosen stages resized to the grid, before local averaging: [N,C,*out_size]."""
        return torch.cat([self.to_grid(f) for f in self.body(x)], 1)

    def to_grid(self, f: torch.Tensor) -> torch.Tensor:
        """One stage onto the grid. 'area' averages every finer stage over each grid cell (each vector
        then describes its whole cell; bilinear downsampling reads 2x2 of every k x k pixels and aliases);
        coarser stages are upsampled bilinearly in both modes."""
        h, w = f.shape[-2:]
        oh, ow = self.out_size
        if self.resample == "area" and (h, w) != (oh, ow) and h >= oh and w >= ow:
            if h % oh or w % ow:
                raise ValueError(f"area resampling needs the {w}x{h} feature stage to be a whole multiple of the "
                                 f"{ow}x{oh} grid; choose an input size divisible by the grid stride")
            return F.avg_pool2d(f, (h // oh, w // ow))
        return F.interpolate(f, size=self.out_size, mode="bilinear", align_corners=False)

    def local_average(self, feats: torch.Tensor) -> torch.Tensor:
        """The ``pool`` x ``pool`` neighbourhood mean (borders: over the cells inside); identity for pool 1.

        Linear and per channel, so it commutes with a per-channel affine map (a z-score)."""
        if self.pool == 1:
            return feats
        return F.avg_pool2d(feats, self.pool, 1, self.pool // 2, count_include_pad=False)


# ----------------------------------------------------------------------------- config
@dataclass
class EfficientADConfig(FamilyConfig):
    """Everything needed to rebuild the network from a checkpoint (stored in it as JSON)."""

    name: str = "efficientad_lite"
    teacher: str = "lite2"  # "lite0"/"lite2" (frozen pretrained EfficientNet-Lite) or "pdn_s"/"pdn_m" (PDN)
    teacher_channels: int = 384  # for PDN teachers; Lite teachers report their own
    teacher_out_indices: tuple[int, ...] = (2, 3)
    teacher_pool: int = 3  # local averaging window of Lite teacher features, in grid cells (1 = off)
    student: str = "strided"  # "s", "m" (paper PDNs) or "strided" (real-time)
    student_width: int = 128
    student_stride: int = 8  # real-time student: 8 (StridedStudent, 32x32 map at 256 px) or 4 (FineStudent, 64x64)
    decoder_sizes: tuple[int, ...] = (3, 8, 15, 32)

    @classmethod
    def from_dict(cls, d: dict) -> "EfficientADConfig":
        d = dict(d)
        d.setdefault("map_blur_px", 0.0)  # checkpoints written before smoothing existed had none
        return super().from_dict(d)


def _grid(cfg: EfficientADConfig) -> tuple[int, int]:
    """Output grid of teacher/student/AE for the configured input size."""
    h, w = cfg.image_size
    if cfg.student == "strided":
        return h // cfg.student_stride, w // cfg.student_stride
    # PDN without padding: conv4 -> pool2 -> conv4 -> pool2 -> conv3 -> conv4
    return tuple(((s - 3) // 2 - 3) // 2 - 2 - 3 for s in (h, w))


# ----------------------------------------------------------------------------- model
class EfficientAD(AnomalyModel):
    """Teacher + student + autoencoder; the maps and pooled features go to the shared deploy head."""

    family = "efficientad"
    map_names = ("student_teacher", "student_autoencoder")
    # --fp16 keeps the frozen teacher in fp32: its features are divided by small per-channel stds, which turns fp16
    # rounding into score errors above 1e-2 (measured on the test model: 0.0107 with an fp16 teacher, 0.0036 without);
    # INT8 leaves it fp32 unless asked (``export onnx --int8-all``)
    export_policy = ExportPolicy(fp16_parts=("student", "autoencoder"), int8_keep_fp32=("/head/", "/teacher/"))
    config_class = EfficientADConfig

    def __init__(self, cfg: EfficientADConfig):
        grid = _grid(cfg)
        if cfg.teacher in ("lite0", "lite2"):
            teacher = LiteTeacher(f"efficientnet_{cfg.teacher}", cfg.teacher_out_indices, grid,
                                  pretrained=cfg.pretrained, pool=cfg.teacher_pool)
            c = teacher.channels
        elif cfg.teacher in ("pdn_s", "pdn_m"):
            if cfg.student == "strided":
                raise ValueError("a PDN teacher needs a PDN student (s or m): their grids must match")
            c = cfg.teacher_channels
            teacher = PDN(cfg.teacher[-1], c)
            for p in teacher.parameters():
                p.requires_grad_(False)
        else:
            raise ValueError(f"teacher {cfg.teacher!r}: choose lite0, lite2, pdn_s or pdn_m")
        if cfg.student == "strided":
            if cfg.student_stride not in (4, 8):
                raise ValueError(f"student stride {cfg.student_stride}: choose 4 or 8")
            if cfg.student_width < 4:  # its first conv has width // 4 channels
                raise ValueError(f"student width {cfg.student_width}: choose 4 or more (default 128)")
            student = (StridedStudent if cfg.student_stride == 8 else FineStudent)(2 * c, cfg.student_width)
            pad_cells = 0
        elif cfg.student in ("s", "m"):
            student = PDN(cfg.student, 2 * c)
            # unpadded PDN output is 4 px (at 256) short of the image border on every side
            pad_cells = round(4 * min(cfg.image_size) / 256)
        else:
            raise ValueError(f"student {cfg.student!r}: choose s, m or strided")
        super().__init__(cfg, grid, feature_dim=c, pad_cells=pad_cells)
        self.teacher, self.student = teacher, student
        self.channels = c
        self.autoencoder = AutoEncoder(c, grid, cfg.decoder_sizes, cfg.image_size)
        # teacher feature normalization (fit on training images before training)
        self.register_buffer("teacher_mean", torch.zeros(1, c, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, c, 1, 1))

    def teacher_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized teacher features [N,C,h,w] (channel-wise z-score over training images)."""
        with torch.no_grad():
            return (self.teacher(x.to(_dtype(self.teacher))).float() - self.teacher_mean) / self.teacher_std

    def grid_features(self, x: torch.Tensor) -> torch.Tensor | None:
        """The Lite teacher's features: the grid the student learns and the maps live on (``train.geometry``);
        None for a PDN teacher with an unpadded student (its border cells are padding, not measured)."""
        return self.teacher_features(x) if isinstance(self.teacher, LiteTeacher) and not self.head.pad_cells else None

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: preprocessed [N,3,H,W] -> (maps [N,2,h,w]: student-teacher, student-autoencoder; pooled [N,C])."""
        c = self.channels
        # each network may run in fp16 (half_networks); maps and statistics stay fp32
        t = self.teacher_features(x)
        s = self.student(x.to(_dtype(self.student))).float()
        a = self.autoencoder(x.to(_dtype(self.autoencoder))).float()
        map_st = torch.mean((t - s[:, :c]) ** 2, dim=1, keepdim=True)
        map_ae = torch.mean((a - s[:, c:]) ** 2, dim=1, keepdim=True)
        pooled = torch.mean(s[:, :c], dim=(2, 3))
        return torch.cat([map_st, map_ae], dim=1), pooled

    def fit(self, fit_frames, val_frames, train_cfg, device: str) -> dict:
        from .efficientad_train import fit_efficientad

        return fit_efficientad(self, fit_frames, train_cfg, device)

    def upgrade_state_dict(self, state: dict) -> dict:
        """Checkpoints before the shared head kept the constants on the model under their own names."""
        if "st_scale" not in state:
            return state
        state = dict(state)
        pop = state.pop
        state["head.map_scale"] = torch.stack([pop("st_scale").reshape(()), pop("ae_scale").reshape(())]).view(1, 2, 1, 1)
        state["head.map_shift"] = torch.stack([pop("st_shift").reshape(()), pop("ae_shift").reshape(())]).view(1, 2, 1, 1)
        for k in ("gaussian_mean", "gaussian_whitener", "score_center", "score_weight"):
            state[f"head.{k}"] = pop(k)
        return state


# ----------------------------------------------------------------------------- registered models
@register_model
def efficientad_lite(image_size=256, **kw) -> EfficientAD:
    """Real-time variant: frozen EfficientNet-Lite2 teacher (stride 8), strided student, short AE.

    Lite2 over Lite0: bottle image AUROC 0.994 vs 0.981 (benchmarks/results/accuracy_bottle_lite*.json)."""
    return EfficientAD(EfficientADConfig(name="efficientad_lite", image_size=parse_hw(image_size), **kw))


@register_model
def efficientad_s(image_size=256, teacher: str = "pdn_s", **kw) -> EfficientAD:
    """Paper EfficientAD-S: PDN-S teacher and student, full autoencoder (76 GFLOP at 256)."""
    return EfficientAD(EfficientADConfig(name="efficientad_s", image_size=parse_hw(image_size), teacher=teacher, student="s",
                                         decoder_sizes=(3, 8, 15, 32, 63, 127), **kw))


@register_model
def efficientad_m(image_size=256, teacher: str = "pdn_m", **kw) -> EfficientAD:
    """Paper EfficientAD-M: PDN-M teacher and student, full autoencoder."""
    return EfficientAD(EfficientADConfig(name="efficientad_m", image_size=parse_hw(image_size), teacher=teacher, student="m",
                                         decoder_sizes=(3, 8, 15, 32, 63, 127), **kw))


