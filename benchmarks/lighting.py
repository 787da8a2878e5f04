"""Does a change of light look like a defect? Painted validation and relit-goods validation of trained checkpoints.

    python -m benchmarks.lighting --data ../shared/data/mvtec_ad/screw --checkpoints runs/a/checkpoint.pt runs/b/checkpoint.pt

For each checkpoint, on the validation split of ``--data`` (the split training used, from ``--seed``):
painted validation (image / pixel AUROC, AUPRO of good frames plus painted defects) and relit-goods validation
(the good frames 10 % darker and 10 % brighter against themselves as taken and against the painted defects, and
their false-alarm rate at the checkpoint's calibrated threshold: ``train.painted_validation.relit_goods``).
Only validation images: this may choose a setting. The test split is never read.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from benchmarks.common import write_result

log = logging.getLogger("benchmarks.lighting")


def validate(checkpoint: str, data: str, seed: int, per_image: int) -> dict:
    from runtime.dataset import open_dataset
    from train.data import load_frames, split_train_validation
    from train.loop import load_checkpoint
    from train.painted_validation import LIGHT_GAINS, painted_validation

    model, blob = load_checkpoint(checkpoint)
    _, val_paths = split_train_validation(open_dataset(data, require_test=False), seed)
    val = load_frames(val_paths, tuple(model.cfg.image_size), "validation images", blob.get("fit", "stretch"))
    r = painted_validation(model, val, per_image, seed, light_gains=LIGHT_GAINS, threshold=blob["thresholds"]["image"])
    painted, relit = r["image_score"], r["lighting"]
    log.info("%s: painted image / pixel AUROC %.3f / %.3f, relit goods %.3f", checkpoint, painted["image_auroc"],
             painted["pixel_auroc"], relit["image_auroc"])
    return {"checkpoint": str(checkpoint), "config": blob["config"], "painted": painted, "relit_goods": relit}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the class folder the checkpoints were trained on")
    p.add_argument("--checkpoints", nargs="+", required=True)
    p.add_argument("--seed", type=int, default=0, help="the training seed (it fixes the validation split)")
    p.add_argument("--per-image", type=int, default=2, help="painted defects per validation image")
    p.add_argument("--name", required=True, help="result file name in benchmarks/results/")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for c in args.checkpoints:
        if not Path(c).is_file():
            p.error(f"--checkpoints {c}: not a file; pass the checkpoint.pt written by `python -m train`")
    rows = [validate(c, args.data, args.seed, args.per_image) for c in args.checkpoints]
    print(write_result(args.name, {"data": args.data, "seed": args.seed, "per_image": args.per_image, "rows": rows}))


if __name__ == "__main__":
    main()
