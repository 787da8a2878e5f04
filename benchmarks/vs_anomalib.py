"""edgead vs anomalib: the same EfficientAD network, both exported to ONNX, both in ONNX Runtime.

    pip install anomalib==2.7.0          # benchmark-only dependency, never a runtime one
    python -m benchmarks.vs_anomalib --sizes s m --batches 1 8

anomalib side: ``anomalib.models.EfficientAd`` (teacher weights cannot be downloaded here, so
fresh weights: this is a speed comparison of the same network) exported with its own
``to_onnx`` (float NCHW input in [0,1], its pre/post-processing inside), run in ONNX Runtime,
fed the way its inferencers feed it (decode -> RGB -> resize -> float -> CHW).
edgead side: our EfficientAD-S/M + PUAD export (uint8 NHWC input, preprocessing, quantile
normalization and the Mahalanobis score fused), fed by ``runtime.model.Model``.
A and B alternate over the same JPEG frames in one process. Reports p50/p99 latency and
throughput end to end (JPEG bytes -> decision) and the ratios.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks.common import write_result

log = logging.getLogger(__name__)


def anomalib_onnx(size: str, work: Path) -> Path:
    import torch
    from anomalib.models import EfficientAd

    torch.manual_seed(0)
    model = EfficientAd(model_size={"s": "small", "m": "medium"}[size]).eval()
    out = model.to_onnx(export_root=work / f"anomalib_{size}", input_size=(256, 256))
    return Path(out)


def edgead_onnx(size: str, work: Path, batch) -> Path:
    from benchmarks.speed_models import checkpoint
    from export.onnx_export import export_onnx

    ck = checkpoint(size, work / f"edgead_{size}.pt")
    return export_onnx(ck, work / f"edgead_{size}_{batch}.onnx", batch=batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["s"], choices=["s", "m"])
    p.add_argument("--batches", type=int, nargs="+", default=[1])
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--results", default=None)
    p.add_argument("--int8", action="store_true", help="also time edgead's INT8 (Q/DQ) export of the same network")
    p.add_argument("--int8-teacher", action="store_true", help="quantize the teacher too (default: it stays fp32)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    import anomalib
    import onnxruntime as ort

    from benchmarks.speed_models import synthetic_good_images
    from runtime.backends.onnxruntime_backend import session_options
    from runtime.bench import percentiles, test_frame
    from runtime.model import Model

    work = Path(tempfile.mkdtemp(prefix="vs_anomalib_"))
    frame = test_frame()
    jpeg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    report = {"anomalib": anomalib.__version__, "onnxruntime": ort.__version__, "cases": []}
    calib = synthetic_good_images(work / "calib", 16) if args.int8 else None
    for size in args.sizes:
        a_path = anomalib_onnx(size, work)
        # the same session settings as edgead's runtime (no spin-waiting threads slowing the other side)
        sess = ort.InferenceSession(str(a_path), session_options(), providers=["CPUExecutionProvider"])
        a_in = sess.get_inputs()[0]
        log.info("anomalib %s input %s %s", size, a_in.name, a_in.shape)
        for b in args.batches:
            if isinstance(a_in.shape[0], int) and a_in.shape[0] != b:
                log.warning("anomalib graph has fixed batch %s; skipping batch %d", a_in.shape[0], b)
                continue
            b_path = edgead_onnx(size, work, b)
            edge = Model(b_path)
            edge8 = None
            if calib is not None:
                from export.quantize import quantize_qdq

                edge8 = Model(quantize_qdq(b_path, work / f"edgead_{size}_{b}_int8.onnx", calib,
                                           quantize_teacher=args.int8_teacher))

            def run_anomalib():
                imgs = []
                for _ in range(b):
                    img = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                    img = cv2.resize(img, (256, 256), interpolation=cv2.INTER_AREA)
                    imgs.append(img.astype(np.float32).transpose(2, 0, 1) / 255.0)
                x = np.stack(imgs)
                out = sess.run(None, {a_in.name: x})
                return out[0] > 0.5  # pred score -> label, as anomalib's post-processor does

            def run_edgead(model=edge):
                frames = [cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR) for _ in range(b)]
                return model.predict(frames).is_ng

            for _ in range(3):
                run_anomalib()
                run_edgead()
            ta, tb, tc = [], [], []
            for _ in range(args.iters):
                t0 = time.perf_counter()
                run_anomalib()
                t1 = time.perf_counter()
                run_edgead()
                t2 = time.perf_counter()
                if edge8 is not None:
                    run_edgead(edge8)
                t3 = time.perf_counter()
                ta.append((t1 - t0) * 1e3)
                tb.append((t2 - t1) * 1e3)
                tc.append((t3 - t2) * 1e3)
            case = {"size": size, "batch": b, "anomalib_onnxruntime": percentiles(ta), "edgead_onnxruntime": percentiles(tb),
                    "anomalib_images_per_s": round(b * 1e3 / float(np.median(ta)), 2),
                    "edgead_images_per_s": round(b * 1e3 / float(np.median(tb)), 2),
                    "speedup_p50": round(float(np.median(ta) / np.median(tb)), 3),
                    "speedup_p99": round(float(np.percentile(ta, 99) / np.percentile(tb, 99)), 3)}
            if edge8 is not None:
                case.update({"edgead_int8_qdq_onnxruntime": percentiles(tc),
                             "edgead_int8_images_per_s": round(b * 1e3 / float(np.median(tc)), 2),
                             "int8_speedup_p50": round(float(np.median(ta) / np.median(tc)), 3),
                             "int8_recipe": "export.quantize target=cpu (uint8 activations, int8 per-channel weights), teacher "
                                            + ("int8" if args.int8_teacher else "fp32"),
                             "int8_note": "INT8 Q/DQ of fresh weights: speed only; INT8 accuracy on a trained model is "
                                          "measured by benchmarks/int8_accuracy.py"})
            report["cases"].append(case)
            log.info("%s b=%d anomalib %.1f ms, edgead %.1f ms, x%.2f", size, b, np.median(ta), np.median(tb),
                     case["speedup_p50"])
    path = write_result("vs_anomalib.json", report, args.results)
    print(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
