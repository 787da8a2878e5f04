"""Train and evaluate EfficientAD and PUAD on an MVTec-layout folder; write a JSON result.

    python -m benchmarks.accuracy --data ../shared/data/mvtec_ad/bottle --size lite --device cuda

Image AUROC, pixel AUROC, AUPRO (FPR <= 0.3) and F1-max for EfficientAD alone and
for PUAD, plus per-defect AUROC, training time, steps and the machine.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from benchmarks.common import write_result
from train.cli import add_model_options


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    add_model_options(p)
    p.add_argument("--steps", type=int, default=70_000)
    p.add_argument("--batch-size", type=int, default=1, help="paper: 1; 8 with steps/8 sees the same number of images")
    p.add_argument("--device", default="cpu")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--map-blur", default=None, metavar="SIGMA|auto",
                   help="map smoothing sigma in px at 256 px (default: the model's 8); auto: chosen on defects painted "
                        "on the validation images, never on the test split")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop after this many steps and save the state (for machines that limit one command's time)")
    p.add_argument("--resume", action="store_true", help="continue a run stopped with --stop-at (same --work)")
    p.add_argument("--work", default="runs/accuracy", help="folder for the checkpoint")
    p.add_argument("--name", default=None, help="result file name (default accuracy_<data>_<size>.json)")
    p.add_argument("--results", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from train.cli import SIZES, model_kwargs
    from train.evaluate import evaluate_model
    from train.loop import TrainConfig, load_checkpoint, parse_map_blur, train

    work = Path(args.work) / f"{Path(args.data).name}_{args.size}"
    cfg = TrainConfig(data=args.data, out=str(work), model=SIZES[args.size], steps=args.steps, device=args.device,
                      image_size=args.image_size, seed=args.seed, amp=args.amp, batch_size=args.batch_size,
                      model_kwargs=model_kwargs(args), stop_at=args.stop_at,
                      map_blur=None if args.map_blur is None else parse_map_blur(args.map_blur))
    t0 = time.time()
    ckpt = train(cfg, resume=args.resume)
    if ckpt.name != "checkpoint.pt":
        print(f"stopped at step {args.stop_at}: run the same command with --resume (and a later --stop-at) to go on")
        return
    model, blob = load_checkpoint(ckpt)
    t1 = time.time()
    metrics = evaluate_model(model, args.data, args.device)
    name = args.name or f"accuracy_{Path(args.data).name}_{args.size}.json"
    path = write_result(name, {"data": str(args.data), "model": SIZES[args.size], "steps": args.steps, "batch_size": args.batch_size,
                               "images_seen": args.steps * args.batch_size,
                               "train_seconds": blob["train"]["train_seconds"], "eval_seconds": time.time() - t1,
                               "total_seconds": time.time() - t0, "config": blob["config"], "map_smoothing": blob.get("map_smoothing"),
                               "metrics": metrics},
                        args.results)
    import json

    print(json.dumps(metrics, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
