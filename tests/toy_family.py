"""A toy model family (the contract's proof): a frozen random conv net, anomaly = distance to the mean patch.

Under 100 lines and nothing outside this file: it trains, exports, calibrates and streams through
the same code as every real family (tests/test_contract.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from train.models.base import AnomalyModel, ExportPolicy, FamilyConfig
from train.models.registry import register_model


@dataclass
class ToyConfig(FamilyConfig):
    name: str = "toy_mean_patch"
    channels: int = 8
    map_blur_px: float = 4.0
    with_gaussian: bool = True


class ToyMeanPatch(AnomalyModel):
    """raw map = squared distance of each stride-8 patch feature to the mean training feature."""

    family = "toy_mean_patch"
    map_names = ("distance",)
    export_policy = ExportPolicy(fp16_parts=("net",))
    config_class = ToyConfig

    def __init__(self, cfg: ToyConfig):
        h, w = cfg.image_size
        super().__init__(cfg, (h // 8, w // 8), feature_dim=cfg.channels if cfg.with_gaussian else 0)
        gen = torch.Generator().manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, cfg.channels, 8, 8), nn.Tanh())
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
                p.requires_grad_(False)
        self.register_buffer("mean_patch", torch.zeros(1, cfg.channels, 1, 1))

    def raw(self, x: torch.Tensor):
        f = self.net(x.to(next(self.net.parameters()).dtype)).float()
        dist = torch.sum((f - self.mean_patch) ** 2, dim=1, keepdim=True)
        return dist, (torch.mean(f, dim=(2, 3)) if self.cfg.with_gaussian else None)

    def fit(self, fit_frames: np.ndarray, val_frames: np.ndarray, train_cfg, device: str) -> dict:
        with torch.no_grad():
            f = self.net(self.preprocess(torch.from_numpy(fit_frames).to(device)))
            self.mean_patch.copy_(f.mean(dim=(0, 2, 3), keepdim=True))
        return {"train_seconds": 0.0, "history": [{"step": 1, "loss": 0.0}]}


@register_model
def toy_mean_patch(image_size=64, **kw) -> ToyMeanPatch:
    from train.models.base import parse_hw

    return ToyMeanPatch(ToyConfig(image_size=parse_hw(image_size), **kw))
