"""What drawing the anomaly map where the features really see is worth, per family and dataset.

    python -m benchmarks.grid_offset --models patchcore_lite --data ../shared/data/mvtec_ad/bottle ... \
        --name grid_offset_patchcore.json

Each model trains once with its grid offset measured (``train.geometry``: a CNN trunk reads each grid cell
from above-left of it, so a defect's response lands below-right of the defect), then the same trained model
is scored twice: its map moved back by the offset, and upsampled as it is (offset 0). Image scores are the
map's maximum on the grid, so only the pixel metrics can move. Per row: painted validation (the held-out good
images plus painted defects: what a default is chosen on) and the test split (reported only): image AUROC,
pixel AUROC, AUPRO. JSON in benchmarks/results/ with machine, command and date.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from benchmarks.common import write_result
from benchmarks.families import parse_spec

log = logging.getLogger("benchmarks.grid_offset")
KEYS = ("image_auroc", "pixel_auroc", "aupro")


def _scores(model, data: str, val, threshold: float, seed: int) -> dict:
    from train.evaluate import evaluate_model
    from train.painted_validation import painted_validation

    test = evaluate_model(model, data, "cpu", threshold)["image_score"]
    painted = painted_validation(model, val, seed=seed)["image_score"]
    return {"painted_validation": {k: painted[k] for k in KEYS}, "test": {k: test[k] for k in KEYS}}


def run_one(spec: str, data: str, work: Path, args) -> dict:
    from train.geometry import drawn_at
    from train.loop import TrainConfig, load_checkpoint, load_training_images, train

    name, kw = parse_spec(spec)
    kw = {**kw, "map_offset_px": None}  # measured when training starts
    out = work / f"{Path(data).parent.name}_{Path(data).name}_{name}"
    cfg = TrainConfig(data=data, out=str(out), model=name, steps=args.steps, batch_size=args.batch_size,
                      image_size=args.image_size, device="cpu", seed=args.seed, model_kwargs=kw)
    t0 = time.perf_counter()
    model, blob = load_checkpoint(train(cfg))
    fit_s = time.perf_counter() - t0
    offset = model.cfg.map_offset_px
    threshold = blob["thresholds"]["image"]
    val = load_training_images(cfg).val  # the held-out split training drew, read once for both sides
    with_offset = _scores(model, data, val, threshold, cfg.seed)
    with drawn_at(model, (0.0, 0.0)):
        without = _scores(model, data, val, threshold, cfg.seed)
    row = {"model": name, "options": {k: v for k, v in kw.items() if k != "map_offset_px"}, "data": str(data),
           "image_size": list(model.cfg.image_size), "map_offset_px": list(offset), "fit_wall_seconds": round(fit_s, 1),
           "with_offset": with_offset, "without_offset": without}
    log.info("%s on %s: offset %s px; painted pixel AUROC %.4f with, %.4f without; test %.4f with, %.4f without",
             spec, Path(data).name, [round(v, 1) for v in offset], with_offset["painted_validation"]["pixel_auroc"],
             without["painted_validation"]["pixel_auroc"], with_offset["test"]["pixel_auroc"], without["test"]["pixel_auroc"])
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, metavar="SPEC", help="NAME or NAME:KEY=VALUE,... (benchmarks.families)")
    p.add_argument("--data", nargs="+", required=True, metavar="DIR", help="class folders (MVTec layout)")
    p.add_argument("--image-size", default=None, help="default: each family's own")
    p.add_argument("--steps", type=int, default=1500, help="training steps of families that train (as benchmarks.families)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/grid_offset")
    p.add_argument("--name", default="grid_offset.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rows = []
    result = {"models": args.models, "data": args.data, "seed": args.seed, "rows": rows}
    for spec in args.models:
        for data in args.data:
            rows.append(run_one(spec, data, Path(args.work), args))
            write_result(args.name, result)
    means = {}
    for side in ("with_offset", "without_offset"):
        for part in ("painted_validation", "test"):
            for k in KEYS:
                means.setdefault(side, {}).setdefault(part, {})[k] = sum(r[side][part][k] for r in rows) / len(rows)
    result["mean"] = means
    print(write_result(args.name, result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
