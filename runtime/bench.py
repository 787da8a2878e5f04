"""`python -m runtime.bench --model model.onnx`: latency and throughput of a deployed model.

Model-only: prepared uint8 batch -> outputs. End to end: JPEG bytes -> decode -> fit to the
input size -> infer -> decision, the work a line PC does per camera frame. torch-free; the
comparison against PyTorch eager lives in ``benchmarks/runtime_vs_eager.py``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time

import cv2
import numpy as np

from .artifact import ArtifactError, atomic_write_text

log = logging.getLogger(__name__)


def percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p90_ms": round(float(np.percentile(a, 90)), 3),
            "p99_ms": round(float(np.percentile(a, 99)), 3), "mean_ms": round(float(a.mean()), 3), "n": len(ms)}


def time_fn(fn, iters: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def test_frame(width: int = 1920, height: int = 1080, seed: int = 0) -> np.ndarray:
    """A camera-sized synthetic part frame (BGR uint8)."""
    from .synthetic import make_part

    part = make_part(np.random.default_rng(seed), 512, "spot")
    return cv2.resize(part.image, (width, height), interpolation=cv2.INTER_LINEAR)


def bench_model(model, frame: np.ndarray, batches=(1,), iters: int = 50) -> dict:
    jpeg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    res = {"provider": model.provider, "frame": list(frame.shape), "batches": {}}
    for b in batches:
        prepared = model.prepare([frame] * b)
        model_only = time_fn(lambda: model.infer(prepared), iters)

        def e2e():
            frames = [cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR) for _ in range(b)]
            return model.predict(frames).is_ng

        end_to_end = time_fn(e2e, iters)
        res["batches"][str(b)] = {
            "model_only": percentiles(model_only), "end_to_end": percentiles(end_to_end),
            "throughput_images_per_s": round(b * 1e3 / float(np.median(end_to_end)), 2),
            "model_only_images_per_s": round(b * 1e3 / float(np.median(model_only)), 2),
        }
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--frame", help="image to use as the camera frame (default: synthetic 1920x1080)")
    p.add_argument("--out", help="write the JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from .model import Model

    try:
        model = Model(args.model, backend=args.backend, device=args.device)
    except (ArtifactError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    frame = cv2.imread(args.frame) if args.frame else test_frame()
    if frame is None:
        print(f"error: cannot read --frame {args.frame}", file=sys.stderr)
        return 2
    res = bench_model(model, frame, args.batch, args.iters)
    res.update({"model": args.model, "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                                                  "python": platform.python_version()},
                "command": " ".join(["python -m runtime.bench"] + (argv if argv is not None else sys.argv[1:])),
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
