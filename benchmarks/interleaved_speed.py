"""Speed ratios of deployed models on a busy machine: their runs interleaved, one JSON.

    python -m benchmarks.interleaved_speed --models base.onnx other.onnx ... --name speed_x.json

A shared CPU's load changes by the second, so timing models one after another compares loads, not
models. Here every round runs each model once (model only: prepared uint8 batch 1 -> outputs, and
end to end: JPEG decode -> fit -> infer -> decision, as ``runtime.bench``), so all see the same load;
the result gives each model's median ms and its ratio to the first model (the baseline).
"""
from __future__ import annotations

import argparse
import os
import time

import cv2
import numpy as np

from benchmarks.common import write_result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.interleaved_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="ONNX artifacts; the first is the baseline")
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--name", default="interleaved_speed.json")
    p.add_argument("--results", default=None)
    args = p.parse_args(argv)
    from runtime.bench import test_frame
    from runtime.model import Model

    models = [Model(m, backend="onnxruntime", device="cpu") for m in args.models]
    frame = test_frame()
    jpeg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    prepared = [m.prepare([frame]) for m in models]
    only = [[] for _ in models]
    e2e = [[] for _ in models]
    loads = []
    for r in range(args.rounds + 3):
        for i, m in enumerate(models):
            t0 = time.perf_counter()
            m.infer(prepared[i])
            t1 = time.perf_counter()
            m.predict([cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)])
            t2 = time.perf_counter()
            if r >= 3:  # warm-up rounds
                only[i].append((t1 - t0) * 1e3)
                e2e[i].append((t2 - t1) * 1e3)
        loads.append(os.getloadavg()[0])
    base_only, base_e2e = np.median(only[0]), np.median(e2e[0])
    rows = [{"model": path, "model_only_ms_p50": round(float(np.median(a)), 2),
             "end_to_end_ms_p50": round(float(np.median(b)), 2),
             "model_only_ratio_to_first": round(float(np.median(a) / base_only), 3),
             "end_to_end_ratio_to_first": round(float(np.median(b) / base_e2e), 3)}
            for path, a, b in zip(args.models, only, e2e)]
    path = write_result(args.name, {"rounds": args.rounds, "batch": 1, "provider": models[0].provider,
                                    "load_average_1min": {"min": min(loads), "max": max(loads)}, "rows": rows},
                        args.results)
    for row in rows:
        print(row)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
