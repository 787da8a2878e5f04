"""GeneralAD on one MVTec class (or the synthetic tray): accuracy, distortion ablation, CPU speed, EfficientAD beside it.

    nice -n 10 python -m benchmarks.generalad --data ../shared/data/mvtec_ad/bottle --steps 300 --batch-size 8

Per distortion variant (``--variants``, each a comma list of distortions; the first is the default model):
train (frozen backbone, discriminator only) -> image AUROC / pixel AUROC / AUPRO / F1-max on the test split
(``train.evaluate.evaluate_model``) and, for choosing a variant without test images, image/pixel AUROC on
validation good images with painted defects (``calibration.synthetic_defects``). The variant with the best
validation score is exported to ONNX and timed with ONNX Runtime at batch 1 (ms/frame). EfficientAD-lite
numbers are read from a stored result (``--efficientad-result``), not retrained.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, write_result

log = logging.getLogger("benchmarks.generalad")


def painted_validation(model, val_frames: np.ndarray, threshold: float, seed: int = 0) -> tuple[dict, dict]:
    """Image/pixel AUROC of the deployed image score on validation good frames plus 2 painted defects each, and
    those goods under a 10 % darker / brighter light against themselves and the painted defects."""
    from train.painted_validation import LIGHT_GAINS, painted_validation as score

    r = score(model, val_frames, per_image=2, seed=seed, light_gains=LIGHT_GAINS, threshold=threshold)
    painted = {"image_auroc": r["image_score"]["image_auroc"], "pixel_auroc": r["image_score"]["pixel_auroc"],
               "aupro": r["image_score"]["aupro"], "n_good": r["n_good"], "n_painted": r["n_painted"]}
    return painted, r["lighting"]


def ort_ms_per_frame(onnx_path: Path, frame: np.ndarray, iters: int = 30) -> dict:
    """ONNX Runtime CPU latency at batch 1 (graph only: the frame is already at the input size)."""
    from runtime.model import Model

    model = Model(onnx_path)
    x = frame[None]
    for _ in range(3):
        model.infer(x)
    ms = []
    for _ in range(iters):
        t = time.perf_counter()
        model.infer(x)
        ms.append((time.perf_counter() - t) * 1e3)
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)), "iters": iters}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/mvtec_ad/bottle")
    p.add_argument("--image-size", default="256")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--variants", nargs="+", default=["noise", "noise,shuffle,copy,attention", "shuffle", "copy", "attention"])
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=JSON", help="extra GeneralADConfig field")
    p.add_argument("--efficientad-result", default=str(RESULTS / "accuracy_bottle_lite2_nopool_cpu_bf16_1500x8.json"))
    p.add_argument("--efficientad-speed", default=str(RESULTS / "bench_lite_nopool_256px_run1.json"))
    p.add_argument("--work", default="runs/generalad")
    p.add_argument("--name", default=None, help="result file name (default generalad_<class>_<size>_<steps>x<batch>.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-speed", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from export.onnx_export import export_onnx
    from train.evaluate import evaluate_model
    from train.loop import TrainConfig, load_checkpoint, load_training_images, train

    extra = {k: json.loads(v) for k, v in (a.split("=", 1) for a in args.model_arg)}
    work = Path(args.work)
    cls = Path(args.data).name
    rows = []
    for variant in args.variants:
        tag = variant.replace(",", "+")
        cfg = TrainConfig(data=args.data, out=str(work / f"{cls}_{tag}"), model="generalad_lite", image_size=args.image_size,
                          steps=args.steps, batch_size=args.batch_size, seed=args.seed, save_every=0,
                          model_kwargs={"distortions": variant, "learning_rate": args.lr, **extra})
        t0 = time.time()
        ckpt = train(cfg)
        model, blob = load_checkpoint(ckpt)
        val = load_training_images(cfg).val
        painted, lighting = painted_validation(model, val, blob["thresholds"]["image"], args.seed)
        total_seconds = time.time() - t0  # training + painted validation, as before; the test split is not counted
        scored = evaluate_model(model, args.data, "cpu", blob["thresholds"]["image"])
        row = {"distortions": variant, "checkpoint": str(ckpt), "train_seconds": blob["train"]["train_seconds"],
               "total_train_seconds": total_seconds,
               "validation_painted": painted, "validation_lighting": lighting,
               "test": scored["image_score"],
               "deployed": scored["deployed"]}  # OK/NG at the calibrated threshold: false alarms, misses
        manifest = Path(args.data) / "manifest.json"
        man = json.loads(manifest.read_text()) if manifest.is_file() else {}
        if "structural" in man and "logical" in man:  # runtime.synthetic data: mean per-defect AUROC of each kind
            row["families"] = {fam: float(np.mean([row["test"]["per_defect_auroc"][d] for d in man[fam]]))
                               for fam in ("structural", "logical")}
        log.info("%s: val painted %s, relit goods %.3f | test %s", variant, row["validation_painted"],
                 row["validation_lighting"]["image_auroc"],
                 {k: row["test"][k] for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max")})
        rows.append(row)
    best = max(rows, key=lambda r: r["validation_painted"]["image_auroc"] + r["validation_painted"]["pixel_auroc"])
    payload = {"data": args.data, "image_size": args.image_size, "steps": args.steps, "batch_size": args.batch_size,
               "lr": args.lr, "model_args": extra, "selection": "best validation painted image+pixel AUROC (no test images)",
               "selected": best["distortions"], "ablation": rows}
    model, blob = load_checkpoint(best["checkpoint"])
    payload["config"] = blob["config"]
    if not args.no_speed:
        onnx = export_onnx(best["checkpoint"], work / f"{cls}_selected.onnx")
        frame = load_training_images(TrainConfig(data=args.data, out=str(work), image_size=args.image_size)).val[0]
        payload["ort_cpu_batch1"] = ort_ms_per_frame(onnx, frame)
        payload["onnx"] = str(onnx)
        # the baseline timed in the same run: an EfficientAD-lite graph of the same input size (1 training step:
        # speed does not depend on the weights)
        base = train(TrainConfig(data=args.data, out=str(work / "efficientad_speed"), model="efficientad_lite",
                                 image_size=args.image_size, steps=1, seed=args.seed, save_every=0,
                                 model_kwargs={"teacher_pool": 1}))
        payload["efficientad_lite_ort_cpu_batch1"] = ort_ms_per_frame(export_onnx(base, work / "efficientad_speed.onnx"), frame)
    eff = Path(args.efficientad_result)
    e = json.loads(eff.read_text()) if eff.is_file() else {}
    stored_class = Path(str(e.get("data", ""))).name
    if "metrics" in e and stored_class != cls:  # another class's numbers are no comparison
        log.warning("stored EfficientAD result %s is for %s, not %s: not attached", eff.name,
                    stored_class or "an unrecorded class", cls)
    elif "metrics" in e:
        m = e["metrics"].get("puad") or e["metrics"].get("image_score")
        payload["efficientad_lite_stored"] = {"file": eff.name, "steps": e.get("steps"), "batch_size": e.get("batch_size"),
                                              "train_seconds": e.get("train_seconds"),
                                              "metrics": {k: m[k] for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max")},
                                              **({"families": e["families"]} if "families" in e else {})}
    name = args.name or f"generalad_{cls}_{args.image_size}_{args.steps}x{args.batch_size}.json"
    print(write_result(name, payload))


if __name__ == "__main__":
    main()
