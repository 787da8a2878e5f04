"""How much the anomaly-map smoothing changes accuracy, on one trained checkpoint.

    python -m benchmarks.map_smoothing --checkpoint runs/accuracy/bottle_lite/checkpoint.pt \\
        --data ../shared/data/mvtec_ad/bottle --sigmas 0 4 8 12

For every sigma (Gaussian, in pixels at the 256 px reference scale; 0 = off) the model
is recalibrated on the checkpoint's own validation split (the score normalization
depends on the smoothed map) and evaluated on DATA/test with the standard metrics.
No retraining: smoothing is a fixed filter after the networks. On synthetic datasets
with a manifest, the structural/logical family AUROCs are reported as well.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from benchmarks.common import write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="MVTec-layout folder the checkpoint was trained on")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0, 4, 8, 12])
    p.add_argument("--device", default="cpu")
    p.add_argument("--name", default=None, help="result file name (default map_smoothing_<data>.json)")
    p.add_argument("--results", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from runtime.dataset import open_dataset
    from train.data import load_frames, split_train_validation
    from train.evaluate import evaluate_model
    from train.loop import calibrate_model, load_checkpoint
    from train.models.efficientad import MapSmoothing

    model, blob = load_checkpoint(args.checkpoint)
    tcfg = blob["train"]
    ds = open_dataset(args.data, require_test=False)
    fit_paths, val_paths = split_train_validation(ds, int(tcfg["seed"]))
    size = model.cfg.image_size
    fit, val = load_frames(fit_paths, size, "train images"), load_frames(val_paths, size, "validation images")
    manifest = Path(args.data) / "manifest.json"
    families = json.loads(manifest.read_text()) if manifest.is_file() else None
    rows = []
    for sigma in args.sigmas:
        model.map_smoothing = MapSmoothing(sigma * model.grid[0] / 256, model.grid).to(args.device)
        model.to(args.device)
        calibrate_model(model, fit, val, args.device, float(tcfg["puad_weight"]), float(tcfg["target_fpr"]))
        m = evaluate_model(model, args.data, args.device)
        row = {"sigma_px_at_256": sigma,
               **{f"efficientad_{k}": m["efficientad"][k] for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max")},
               "puad_image_auroc": m["puad"]["image_auroc"]}
        if families:
            for name in ("efficientad", "puad"):
                per = m[name]["per_defect_auroc"]
                for fam in ("structural", "logical"):
                    row[f"{name}_{fam}_auroc"] = float(np.mean([per[d] for d in families[fam]]))
        logging.info("%s", row)
        rows.append(row)
    name = args.name or f"map_smoothing_{Path(args.data).name}.json"
    path = write_result(name, {"checkpoint": str(args.checkpoint), "checkpoint_config": blob["config"],
                               "train_steps": tcfg["steps"], "batch_size": tcfg["batch_size"], "rows": rows},
                        args.results)
    print(json.dumps(rows, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
