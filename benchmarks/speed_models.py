"""Models for speed benchmarks: the paper's EfficientAD-S/M networks and edgead's real-time model.

Speed does not depend on weight values, so these are built with fresh weights and
plausible calibration constants (accuracy is measured separately, in accuracy_*.json).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from train.loop import save_checkpoint
from train.models import create_model

VARIANTS = {
    "s": ("efficientad_s", {"teacher": "pdn_s"}),
    "m": ("efficientad_m", {"teacher": "pdn_m"}),
    "lite": ("efficientad_lite", {"teacher": "lite2", "pretrained": False}),
    "lite0": ("efficientad_lite", {"teacher": "lite0", "pretrained": False}),
}


ALL_NETWORKS = ("teacher", "student", "autoencoder")  # fp16 everywhere (export's --fp16-teacher); the
# family's default --fp16 keeps the teacher fp32 (EfficientAD.export_policy)


def build(variant: str, image_size: int = 256, seed: int = 0):
    torch.manual_seed(seed)
    name, kw = VARIANTS[variant]
    m = create_model(name, image_size=image_size, **kw).eval()
    c = m.channels
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(c, c)) / np.sqrt(c)
    # the constants of quantiles q_a = 0.2, q_b = 2.2 for both maps (calibration.fitting.map_affine)
    m.head.write(map_scale=[0.025, 0.025], map_shift=[-0.005, -0.005], gaussian_mean=rng.normal(size=c) * 0.01,
                 gaussian_whitener=np.tril(a) + np.eye(c), score_center=[0.1, 10.0], score_weight=[5.0, 0.1])
    m.calibrated.fill_(True)
    return m


def checkpoint(variant: str, path: Path, image_size: int = 256) -> Path:
    """Write a calibrated checkpoint of ``variant`` (fresh weights) that export accepts."""
    m = build(variant, image_size)
    c = m.channels
    save_checkpoint(path, m, {
        "normalization": {"map_names": list(m.map_names), "q_low": [0.2, 0.2], "q_high": [2.2, 2.2],
                          "quantile_a": 0.9, "quantile_b": 0.995, "n_images": 0},
        "gaussian": {"dim": c, "n_images": 0, "estimator": "none", "shrinkage": 0.0, "condition_number": 0.0},
        "score": {"map_mean": 0.1, "map_std": 0.1, "gaussian_mean": 10.0, "gaussian_std": 5.0, "puad_weight": 0.5},
        "thresholds": {"image": 3.0, "pixel": 0.1, "method": "speed-benchmark (fresh weights)", "target_fpr": None,
                       "expected_fpr": None},
        "source_shape": [image_size, image_size, 3],
        "train": {"note": "fresh weights for speed measurement only"},
    })
    return path


def count_gflops(model, image_size: int = 256) -> float:
    """Multiply-adds x2 of the convolutions (the bulk of the cost), by forward hooks."""
    total = [0]

    def hook(mod, inp, out):
        k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
        total[0] += 2 * k * out.numel()

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, image_size, image_size, 3, dtype=torch.uint8))
    for h in hs:
        h.remove()
    return total[0] / 1e9


def synthetic_good_images(folder: Path, n: int, size: int = 256) -> Path:
    """A folder of ``n`` generated good parts: INT8 calibration images for fresh-weight speed runs."""
    from runtime.synthetic import write_dataset

    return write_dataset(folder, size=size, n_train=n, n_test_good=0, n_per_defect=0, defects=()) / "train" / "good"
