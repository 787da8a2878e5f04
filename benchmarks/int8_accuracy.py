"""INT8 vs fp32 of one trained model, on real data: accuracy and CPU latency side by side.

    python -m benchmarks.int8_accuracy --checkpoint runs/accuracy/bottle_lite/checkpoint.pt \
        --data ../shared/data/mvtec_ad/bottle

Exports the checkpoint to fp32 ONNX, quantizes it with ``export.quantize`` (CPU recipe:
uint8 activations, int8 per-channel weights) with the teacher kept fp32 and with the teacher
quantized too, refits every artifact's constants on the same good images with
``calibration.calibrate`` (what ``python -m export onnx --int8`` does), then runs each through
``runtime.Model`` (ONNX Runtime CPU) on the test split: image AUROC, pixel AUROC, AUPRO,
F1-max, and model-only latency at batch 1, alternating over the same frame.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import write_result

log = logging.getLogger(__name__)


def score_artifact(path: Path, data: str) -> dict:
    """Deployed-path metrics: image files -> the runtime's prepare + infer -> standard metrics."""
    from calibration.field import batched
    from calibration.metrics import evaluate
    from runtime.dataset import open_dataset, read_image, read_mask
    from runtime.model import Model

    model = Model(path, warmup=0)
    ds = open_dataset(data)
    maps, pict, image = [], [], []
    for chunk in batched(ds.test, 8):
        out = model.infer(model.prepare([read_image(s.path) for s in chunk]))
        maps.append(out["anomaly_map"][:, 0])
        pict.append(out["map_score"])
        image.append(out["image_score"])
    labels = np.array([s.label for s in ds.test])
    maps = np.concatenate(maps)
    masks = np.stack([read_mask(s, maps.shape[1], maps.shape[2]) for s in ds.test])
    res = {"efficientad": dataclasses.asdict(evaluate(labels, np.concatenate(pict), masks, maps)),
           "puad": dataclasses.asdict(evaluate(labels, np.concatenate(image)))}
    model.close()
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="trained, calibrated checkpoint (python -m train)")
    p.add_argument("--data", required=True, help="MVTec-layout category folder with test/ (and ground_truth/)")
    p.add_argument("--calib", default=None, help="good images for Q/DQ scales and constant refits (default DATA/train/good)")
    p.add_argument("--iters", type=int, default=30, help="timed batch-1 runs per artifact")
    p.add_argument("--name", default=None, help="result file (default int8_accuracy_<data>_<model>.json)")
    p.add_argument("--results", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("root").setLevel(logging.ERROR)  # the ORT quantizer's pre-processing advice
    from calibration.field import calibrate
    from export.onnx_export import export_onnx
    from export.quantize import quantize_qdq
    from runtime.bench import percentiles, test_frame
    from runtime.model import Model

    calib = args.calib or str(Path(args.data) / "train" / "good")
    work = Path(tempfile.mkdtemp(prefix="edgead_int8_"))
    fp32 = export_onnx(args.checkpoint, work / "fp32.onnx")
    arts = {"fp32_training_constants": fp32}
    refit = work / "fp32_refit.onnx"
    shutil.copy(fp32, refit)
    shutil.copy(str(fp32) + ".json", str(refit) + ".json")
    calibrate(refit, calib)
    arts["fp32_refit"] = refit
    t0 = time.time()
    for name, teacher in (("int8_teacher_fp32", False), ("int8_all", True)):
        q = quantize_qdq(fp32, work / f"{name}.onnx", calib, quantize_teacher=teacher, target="cpu")
        calibrate(q, calib)
        arts[name] = q
    quantize_and_refit_seconds = (time.time() - t0) / 2
    metrics = {k: score_artifact(v, args.data) for k, v in arts.items()}
    models = {k: Model(v) for k, v in arts.items() if k != "fp32_training_constants"}
    prepared = models["fp32_refit"].prepare([test_frame()])
    times = {k: [] for k in models}
    for _ in range(args.iters):  # alternate over the same frame so machine noise hits all alike
        for k, m in models.items():
            t = time.perf_counter()
            m.infer(prepared)
            times[k].append((time.perf_counter() - t) * 1e3)
    base = float(np.median(times["fp32_refit"]))
    latency = {k: {**percentiles(v), "speedup_vs_fp32_p50": round(base / float(np.median(v)), 3)}
               for k, v in times.items()}
    ref = metrics["fp32_refit"]
    compared = {"image_auroc": ("efficientad", "image_auroc"), "pixel_auroc": ("efficientad", "pixel_auroc"),
                "aupro": ("efficientad", "aupro"), "puad_image_auroc": ("puad", "image_auroc")}
    delta = {k: {name: round(m[score][metric] - ref[score][metric], 4) for name, (score, metric) in compared.items()}
             for k, m in metrics.items() if k.startswith("int8")}
    res = {"checkpoint": str(args.checkpoint), "data": args.data, "calibration_images": calib,
           "recipe": "export.quantize target=cpu: uint8 asymmetric activations, int8 symmetric per-channel weights, "
                     "percentile 99.99, Conv+Relu+AveragePool; constants refit on the calibration images",
           "quantize_and_refit_seconds": round(quantize_and_refit_seconds, 1), "metrics": metrics, "int8_minus_fp32_refit": delta,
           "model_only_batch1": latency, "provider": models["fp32_refit"].provider}
    name = args.name or f"int8_accuracy_{Path(args.data).name}_{Path(args.checkpoint).parent.name}.json"
    path = write_result(name, res, args.results)
    print(json.dumps({"int8_minus_fp32_refit": delta, "latency": latency}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
