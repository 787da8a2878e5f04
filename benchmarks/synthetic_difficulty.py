"""How hard is each class of the multi-class benchmark? A training-free kNN baseline per class.

    python -m benchmarks.synthetic_difficulty                       # synthetic classes, 128 px
    python -m benchmarks.synthetic_difficulty --real-textures --image-size 256

Generates the classes (runtime.synthetic_classes), then for each class: frozen ImageNet
EfficientNet-Lite0 features of stages 2 and 3 (3x3-averaged, stage 3 upsampled to the stride-8
grid), a memory of every training patch, anomaly map = distance to the nearest memory patch
(bilinear to the input, Gaussian blur sigma 4 px at 256), image score = map maximum. No training.
Reports image AUROC, pixel AUROC, AUPRO, F1-max per class and image AUROC per defect type.
The point is a sanity check of the data: scores should spread between chance and 1.0.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks.common import write_result

log = logging.getLogger(__name__)


def knn_scores(extractor, train: np.ndarray, test: np.ndarray, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """uint8 BGR [N,S,S,3] train and test frames -> (image scores [M], anomaly maps float32 [M,S,S])."""
    import torch
    import torch.nn.functional as F

    def feats(frames: np.ndarray) -> torch.Tensor:
        out = []
        for i in range(0, len(frames), batch):
            x = torch.from_numpy(frames[i:i + batch][..., ::-1].copy()).permute(0, 3, 1, 2).float() / 255
            f2, f3 = extractor((x - 0.5) / 0.5)
            f2 = F.avg_pool2d(f2, 3, 1, 1)
            f3 = F.interpolate(F.avg_pool2d(f3, 3, 1, 1), size=f2.shape[-2:], mode="bilinear", align_corners=False)
            out.append(torch.cat([f2, f3], 1))
        return torch.cat(out)

    size = train.shape[1]
    with torch.no_grad():
        ft = feats(train)
        c, g = ft.shape[1], ft.shape[-2:]
        memory = ft.permute(0, 2, 3, 1).reshape(-1, c)
        fq = feats(test)
        maps = []
        for q in fq:
            d = torch.cdist(q.permute(1, 2, 0).reshape(-1, c), memory).min(1).values.reshape(1, 1, *g)
            maps.append(F.interpolate(d, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy())
    sigma = 4.0 * size / 256
    maps = np.stack([cv2.GaussianBlur(m, (0, 0), sigma) for m in maps]).astype(np.float32)
    return maps.reshape(len(maps), -1).max(1), maps


def evaluate_class(extractor, root: Path, size: int) -> dict:
    """Scores of the kNN baseline on one MVTec-layout class folder."""
    from calibration.metrics import auroc, evaluate
    from runtime.dataset import open_dataset, read_mask
    from train.data import load_frames

    t0 = time.perf_counter()
    ds = open_dataset(root)
    train = load_frames(ds.train, size)
    test = load_frames([s.path for s in ds.test], size)
    scores, maps = knn_scores(extractor, train, test)
    labels = np.array([s.label for s in ds.test])
    masks = np.stack([read_mask(s, size, size) for s in ds.test])
    m = evaluate(labels, scores, masks, maps)
    good = labels == 0
    per_defect = {}
    for d in ds.defect_types:
        sel = good | np.array([s.defect == d for s in ds.test])
        per_defect[d] = round(auroc(labels[sel], scores[sel]), 4)
    return {"image_auroc": round(m.image_auroc, 4), "pixel_auroc": round(m.pixel_auroc, 4), "aupro": round(m.aupro, 4),
            "f1_max": round(m.f1_max, 4), "per_defect_image_auroc": per_defect, "n_train": len(ds.train),
            "n_test": len(ds.test), "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", nargs="+", help="default: every synthetic class")
    p.add_argument("--real-textures", action="store_true", help="add brick, grass, gravel (scikit-image photos)")
    p.add_argument("--image-size", type=int, default=128, help="model input side (images are stretched to it)")
    p.add_argument("--gen-size", type=int, default=256, help="side the dataset is generated at")
    p.add_argument("--train", type=int, default=40)
    p.add_argument("--test-good", type=int, default=15)
    p.add_argument("--per-defect", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="existing parent folder of classes to score instead of generating one")
    p.add_argument("--name", help="result file name (default synthetic_difficulty_<size>px.json)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from runtime.synthetic_classes import REAL_SOURCES, SYNTHETIC, write_classes
    from train.backbone import create_feature_extractor

    torch.manual_seed(0)
    classes = tuple(a.classes) if a.classes else SYNTHETIC
    if a.real_textures:
        classes += tuple(c for c in REAL_SOURCES if c not in classes)
    extractor = create_feature_extractor("efficientnet_lite0", (2, 3))
    with tempfile.TemporaryDirectory(prefix="synthetic_difficulty_") as tmp:
        root = Path(a.data) if a.data else write_classes(tmp, classes, a.gen_size, a.train, a.test_good, a.per_defect, a.seed)
        rows = {}
        for c in classes:
            rows[c] = evaluate_class(extractor, root / c, a.image_size)
            log.info("%-10s image %.3f pixel %.3f aupro %.3f  %s", c, rows[c]["image_auroc"], rows[c]["pixel_auroc"],
                     rows[c]["aupro"], rows[c]["per_defect_image_auroc"])
    mean = {k: round(float(np.mean([r[k] for r in rows.values()])), 4) for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max")}
    payload = {"baseline": "kNN on frozen efficientnet_lite0 stages (2, 3), 3x3 avg, full memory, blur sigma 4 px @256, "
               "image score = map max", "image_size": a.image_size, "gen_size": a.gen_size, "seed": a.seed,
               "data": a.data or "generated in a temporary folder",
               "counts": ({"train": a.train, "test_good": a.test_good, "per_defect": a.per_defect} if not a.data
                          else "see n_train / n_test per class"),
               "torch_threads": torch.get_num_threads(), "classes": rows, "mean": mean}
    out = write_result(a.name or f"synthetic_difficulty_{a.image_size}px.json", payload)
    print(f"mean image AUROC {mean['image_auroc']:.3f}, pixel AUROC {mean['pixel_auroc']:.3f}, AUPRO {mean['aupro']:.3f} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
