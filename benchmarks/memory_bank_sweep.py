"""Memory-bank design sweep: input size x memory size x map blur, chosen on painted defects, never on the test split.

    nice -n 10 python -m benchmarks.memory_bank_sweep --data ../shared/data/mvtec_ad/screw --image-size 384 \\
        --memory 1024 2048 --blur 4 8 --name memory_bank_sweep_screw_384.json

For one dataset and one input size: frozen ``patchcore_lite`` features of the fit split, of the held-out
validation images (good), of defects painted on those validation images
(``calibration.synthetic_defects``: the labelled set a user has without defect images) and of the
test split; one greedy coreset (the family's own ``calibration.memory.greedy_coreset``, projection
128, seed 0) whose first M items are the memory of size M; exact nearest-neighbour distances; the
family's deploy head for the blur; the standard metrics on both the painted-validation set
(``val_*``: what a default may be chosen on) and the test split (reported only).
The map normalization is affine per map, so AUROC/AUPRO equal the calibrated graph's.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from benchmarks.common import write_result

log = logging.getLogger("benchmarks.memory_bank_sweep")


def nn_distance(query: np.ndarray, memory: np.ndarray, chunk: int = 4096):
    """query [N,C,h,w], memory [M,C] -> float32 torch [N,1,h,w]: exact (float64) distance to the nearest item."""
    import torch

    n, c, h, w = query.shape
    a = torch.from_numpy(query).permute(0, 2, 3, 1).reshape(-1, c).double()
    b = torch.from_numpy(memory).double()
    d = torch.cat([torch.cdist(a[i:i + chunk], b).amin(1) for i in range(0, len(a), chunk)])
    return d.float().reshape(n, 1, h, w)


def head_outputs(dist, grid, hw, blur: float) -> tuple[np.ndarray, np.ndarray]:
    """The family's deploy head at this blur: (image scores [N], anomaly maps [N,H,W])."""
    import torch

    from train.models.head import DeployHead

    head = DeployHead(("nn_distance",), grid, blur_px=blur)
    with torch.no_grad():
        o = head(dist, None, hw)
    return o["image_score"].numpy(), o["anomaly_map"][:, 0].numpy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_bank_sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="MVTec-layout class folder")
    p.add_argument("--image-size", type=int, default=320, help="square input side, px")
    p.add_argument("--memory", type=int, nargs="+", default=[1024, 2048], help="memory sizes (items)")
    p.add_argument("--blur", type=float, nargs="+", default=[4.0, 8.0], help="map blur sigmas, px at 256")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="memory_bank_sweep.json")
    p.add_argument("--results", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from calibration.memory import greedy_coreset
    from calibration.metrics import evaluate
    from calibration.synthetic_defects import paint_defects
    from runtime.dataset import open_dataset, read_mask
    from train.data import load_frames, split_train_validation
    from train.models.patchcore import patchcore_lite

    h = w = args.image_size
    ds = open_dataset(args.data)
    fit_paths, val_paths = split_train_validation(ds, args.seed)
    model = patchcore_lite(image_size=(h, w), memory_size=max(args.memory))
    t0 = time.perf_counter()
    fit, val = load_frames(fit_paths, (h, w)), load_frames(val_paths, (h, w))
    test = load_frames([s.path for s in ds.test], (h, w))
    painted, painted_masks, _ = paint_defects(val, 3, args.seed)
    f_fit, f_val, f_painted, f_test = (model.extract(x, "cpu", batch=8) for x in (fit, val, painted, test))
    t_features = time.perf_counter() - t0
    labels = np.array([s.label for s in ds.test])
    masks = np.stack([read_mask(s, h, w) for s in ds.test])
    grid = f_fit.shape[2:]
    patches = f_fit.transpose(0, 2, 3, 1).reshape(-1, f_fit.shape[1])
    t0 = time.perf_counter()
    order = greedy_coreset(patches, max(args.memory), 128, args.seed)
    t_coreset = time.perf_counter() - t0
    val_labels = np.r_[np.zeros(len(val)), np.ones(len(painted))]
    val_masks = np.concatenate([np.zeros((len(val), h, w), np.uint8), painted_masks])
    rows = []
    for m in args.memory:
        memory = patches[order[:m]]
        d_val, d_painted, d_test = (nn_distance(f, memory) for f in (f_val, f_painted, f_test))
        for blur in args.blur:
            s_val, m_val = head_outputs(d_val, grid, (h, w), blur)
            s_pd, m_pd = head_outputs(d_painted, grid, (h, w), blur)
            v = evaluate(val_labels, np.r_[s_val, s_pd], val_masks, np.concatenate([m_val, m_pd]))
            s_test, m_test = head_outputs(d_test, grid, (h, w), blur)
            t = evaluate(labels, s_test, masks, m_test)
            row = {"memory": m, "blur": blur,
                   "val_image_auroc": v.image_auroc, "val_pixel_auroc": v.pixel_auroc, "val_aupro": v.aupro,
                   "test_image_auroc": t.image_auroc, "test_pixel_auroc": t.pixel_auroc, "test_aupro": t.aupro}
            log.info("%s", {k: round(x, 4) if isinstance(x, float) else x for k, x in row.items()})
            rows.append(row)
    write_result(args.name, {"data": str(args.data), "image_size": [h, w], "n_fit": len(fit), "n_val": len(val),
                             "n_painted": len(painted), "n_test": len(labels), "patches": int(len(patches)),
                             "feature_seconds": round(t_features, 1), "coreset_seconds": round(t_coreset, 1),
                             "rows": rows}, args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
