"""The deploy head: everything after a family's networks, shared by every family.

A family's networks end in K raw anomaly maps at grid resolution ``[N,K,h,w]`` (and, for
families with a global component, pooled features ``[N,D]``). The head turns them into
the deployed outputs, always with the same arithmetic:

1. per-map affine normalization (quantiles q_a -> 0, q_b -> 0.1 of good images, maps averaged):
   ``norm = sum_k(raw_k * map_scale[k] + map_shift[k])``;
2. Gaussian smoothing of ``norm`` at grid resolution (sigma in px at the 256 px reference);
3. ``map_score = max(norm)``; optional zero border (unpadded PDN students); bilinear upsampling
   to the input size, shifted by the family's measured grid offset (``map_offset_px``: where a
   cell's content really sits, ``train/geometry.py``) -> ``anomaly_map``;
4. with features: ``gaussian_score`` = Mahalanobis distance of the features to the good-image
   Gaussian (one matmul with the Cholesky factor of the precision);
5. ``image_score`` = ``d_0 + relu(d_1)`` with ``d = (scores - score_center) * score_weight``
   (PUAD's gated sum; without features just ``d_0``).

Every decision constant is a buffer whose name is a named initializer of the exported graph
(``calibration_names``), rewritten torch-free by ``python -m calibration fit``. Calibration
scores candidate constants through the exported graph's own post-network part, so this module
is the one implementation of that arithmetic.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


class DeployHead(nn.Module):
    """Raw maps (+ features) -> anomaly_map, map_score, [gaussian_score], image_score.

    maps: float32 [N,K,h,w] raw per-map anomaly (larger = more anomalous); features: float32
    [N,D] or None. ``blur_px``: smoothing sigma in input px at the 256 px reference (short side);
    ``pad_cells``: zero border added after smoothing, in grid cells (for unpadded networks);
    ``map_offset_px``: (dy, dx) in input px, how far below / right of its cell's centre a defect's
    response lands on the grid (a CNN trunk with symmetric padding reads each cell from above-left of
    it); the upsampled map is moved back by it, rounded to whole pixels. (0, 0): plain upsampling.
    """

    def __init__(self, map_names: tuple[str, ...], grid: tuple[int, int], feature_dim: int = 0,
                 blur_px: float = 0.0, pad_cells: int = 0, map_offset_px: tuple[float, float] = (0.0, 0.0)):
        super().__init__()
        self.map_names = tuple(map_names)
        self.grid = (int(grid[0]), int(grid[1]))
        self.feature_dim = int(feature_dim)
        self.pad_cells = int(pad_cells)
        k = len(self.map_names)
        # stored in the shape they are used in ([1,K,1,1]): a reshape would be folded into an unnamed constant
        self.register_buffer("map_scale", torch.full((1, k, 1, 1), 1.0 / k))
        self.register_buffer("map_shift", torch.zeros(1, k, 1, 1))
        n_scores = 2 if self.feature_dim else 1
        if self.feature_dim:
            self.register_buffer("gaussian_mean", torch.zeros(self.feature_dim))
            self.register_buffer("gaussian_whitener", torch.eye(self.feature_dim))
        self.register_buffer("score_center", torch.zeros(n_scores))
        self.register_buffer("score_weight", torch.full((n_scores,), 1.0 / n_scores))
        self.blur_px = 0.0
        self.set_smoothing(blur_px)
        self.map_offset_px = (0.0, 0.0)
        self.set_offset(map_offset_px)

    @property
    def calibration_names(self) -> tuple[str, ...]:
        """Buffers calibration rewrites; the exported graph carries them as named initializers."""
        g = ("gaussian_mean", "gaussian_whitener") if self.feature_dim else ()
        return ("map_scale", "map_shift") + g + ("score_center", "score_weight")

    @property
    def output_names(self) -> tuple[str, ...]:
        g = ("gaussian_score", "features") if self.feature_dim else ()
        return ("anomaly_map", "image_score", "map_score") + g + ("raw_maps",)

    def set_smoothing(self, blur_px: float) -> None:
        """Sigma in input px at the 256 px reference (the short side maps to 256); 0 = off."""
        self.blur_px = float(blur_px)
        device = self.map_scale.device
        self.smoothing = MapSmoothing(self.blur_px * min(self.grid) / 256, self.grid).to(device)

    def set_offset(self, map_offset_px) -> None:
        """(dy, dx) in input px; the map is shifted by the rounded values (whole output pixels)."""
        dy, dx = (float(v) for v in map_offset_px)
        self.map_offset_px = (dy, dx)

    @property
    def drawn_offset_px(self) -> tuple[int, int]:
        """(dy, dx) as the graph applies it: whole output pixels."""
        dy, dx = (int(round(v)) for v in self.map_offset_px)
        return dy, dx

    def upsample(self, norm: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
        """Bilinear (half-pixel) upsampling of [N,1,h,w] to ``out_hw``, read ``map_offset_px`` further on, so a
        defect's response is drawn where the defect is. The grid is edge-padded by whole cells first: inside,
        the padded upsampling equals the plain one; beyond the border it continues it as bilinear clamping does."""
        dy, dx = self.drawn_offset_px
        if not (dy or dx):
            return F.interpolate(norm, size=out_hw, mode="bilinear", align_corners=False)
        h, w = int(norm.shape[-2]), int(norm.shape[-1])  # static per graph: whole-cell padding and crop are constants
        big_h, big_w = int(out_hw[0]), int(out_hw[1])
        if big_h % h or big_w % w:
            raise ValueError(f"a grid offset needs the {big_w}x{big_h} output to be a whole multiple of the {w}x{h} "
                             "map; choose an input size divisible by the family's grid stride")
        sy, sx = big_h // h, big_w // w
        ky, kx = -(-abs(dy) // sy), -(-abs(dx) // sx)  # whole cells of padding that cover the shift
        padded = F.pad(norm, (kx, kx, ky, ky), mode="replicate")
        up = F.interpolate(padded, size=((h + 2 * ky) * sy, (w + 2 * kx) * sx), mode="bilinear", align_corners=False)
        y0, x0 = ky * sy + dy, kx * sx + dx
        return up[:, :, y0:y0 + big_h, x0:x0 + big_w]

    def forward(self, maps: torch.Tensor, features: torch.Tensor | None,
                out_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        norm = torch.sum(maps * self.map_scale + self.map_shift, dim=1, keepdim=True)
        norm = self.smoothing(norm)
        map_score = torch.amax(norm, dim=(1, 2, 3))
        if self.pad_cells:
            p = self.pad_cells
            norm = F.pad(norm, (p, p, p, p))
        out = {"anomaly_map": self.upsample(norm, out_hw)}
        if self.feature_dim:
            z = torch.matmul(features - self.gaussian_mean, self.gaussian_whitener)
            gaussian = torch.sqrt(torch.sum(z * z, dim=1) + 1e-12)
            d = (torch.stack([map_score, gaussian], dim=1) - self.score_center) * self.score_weight
            out["image_score"] = d[:, 0] + torch.relu(d[:, 1])
            out.update(map_score=map_score, gaussian_score=gaussian, features=features)
        else:
            # [N] - [1] broadcasts: indexing [0] would be a Slice of a constant, folded into an unnamed one on export
            out["image_score"] = (map_score - self.score_center) * self.score_weight
            out["map_score"] = map_score
        out["raw_maps"] = maps
        return out

    def write(self, **vals) -> None:
        """Write named constants (floats / array-likes of any dtype), keeping each buffer's shape."""
        for k, v in vals.items():
            if k not in self.calibration_names:
                raise KeyError(f"{k!r} is not a calibration constant of this head ({', '.join(self.calibration_names)})")
            buf = getattr(self, k)
            buf.copy_(torch.as_tensor(v, dtype=buf.dtype, device=buf.device).reshape(buf.shape))

    def constants(self) -> dict[str, "object"]:
        """Current constants as float32 numpy arrays, by name."""
        return {k: getattr(self, k).detach().cpu().float().numpy().copy() for k in self.calibration_names}
