"""edgead's ONNX Runtime path vs the same model in PyTorch eager with Python pre/post-processing.

    python -m benchmarks.runtime_vs_eager --variant s      # EfficientAD-S + PUAD (paper network)
    python -m benchmarks.runtime_vs_eager --variant lite   # edgead real-time model

Both sides do the same work per camera frame: JPEG bytes of a 1920x1080 frame -> decode ->
resize -> normalize -> teacher/student/autoencoder -> quantile normalization -> map upsampling
-> Mahalanobis -> PUAD score -> OK/NG. The eager side is written the way research code deploys
(torch tensors, Python-side steps, numpy Mahalanobis); the edgead side is one fused ONNX graph
fed uint8 frames. The two run alternately over the same frames, in one process, so machine
noise hits both alike. Also measures the stream's own overhead on a 1920x1080 video.
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
import torch
import torch.nn.functional as F

from benchmarks.common import write_result
from benchmarks.speed_models import build, checkpoint, count_gflops, synthetic_good_images
from calibration.fitting import gated_sum

log = logging.getLogger(__name__)


class EagerBaseline:
    """The model as a research repo would run it: PyTorch eager, Python-side pre/post-processing."""

    def __init__(self, model, blob_norm: dict):
        self.m = model.eval()
        self.size = model.cfg.image_size
        self.mean = torch.tensor(model.cfg.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(model.cfg.std).view(1, 3, 1, 1)
        self.n = blob_norm
        self.mu = model.gaussian_mean.numpy().astype(np.float64)
        w = model.gaussian_whitener.numpy().astype(np.float64)
        self.precision = w @ w.T
        self.center = model.score_center.numpy()
        self.weight = model.score_weight.numpy()
        self.threshold = 3.0

    @torch.no_grad()
    def __call__(self, jpeg: bytes):
        img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        rgb = cv2.resize(rgb, (self.size, self.size), interpolation=cv2.INTER_AREA)
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
        x = (x - self.mean) / self.std
        m, c = self.m, self.m.channels
        t = (m.teacher(x) - m.teacher_mean) / m.teacher_std
        s = m.student(x)
        a = m.autoencoder(x)
        map_st = torch.mean((t - s[:, :c]) ** 2, dim=1, keepdim=True)
        map_ae = torch.mean((a - s[:, c:]) ** 2, dim=1, keepdim=True)
        n = self.n
        map_st = 0.1 * (map_st - n["q_st_a"]) / (n["q_st_b"] - n["q_st_a"])
        map_ae = 0.1 * (map_ae - n["q_ae_a"]) / (n["q_ae_b"] - n["q_ae_a"])
        amap = 0.5 * map_st + 0.5 * map_ae
        if m.map_pad:
            amap = F.pad(amap, (4, 4, 4, 4))
        amap = F.interpolate(amap, size=(self.size, self.size), mode="bilinear")
        picturable = float(amap.max())
        f = torch.mean(s[:, :c], dim=(2, 3))[0].numpy().astype(np.float64) - self.mu
        unpicturable = float(np.sqrt(f @ self.precision @ f))
        score = float(gated_sum(picturable, unpicturable, self.center, self.weight)[0])
        return amap[0, 0].numpy(), score, score >= self.threshold


def line_video(work: Path, n: int = 60) -> Path:
    """A 1920x1080 MJPG video of the synthetic conveyor (what a line camera records)."""
    from runtime.synthetic import conveyor_frames

    video = work / "line_1080p.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30, (1920, 1080))
    for f, _ in conveyor_frames(n, size=512, seed=1, frame_size=(1920, 1080)):
        w.write(f)
    w.release()
    return video


def stream_overhead(model_path: Path, video: Path) -> dict:
    """Stream ``video`` through runtime.stream (block policy: every frame) and report overhead."""
    from runtime.model import Model
    from runtime.sources import CaptureSource
    from runtime.stream import Stream

    model = Model(model_path)
    summary = Stream(model, CaptureSource(str(video), "video"), sink=None).run()
    return {"frames": summary.frames_scored, "fps": summary.fps, "model_ms_mean": summary.model_ms_mean,
            "latency_ms_p50": summary.latency_ms_p50, "latency_ms_p99": summary.latency_ms_p99,
            "overhead_fraction": summary.overhead_fraction, "idle_fraction": summary.idle_fraction,
            "wall_ms_per_frame": round(summary.wall_seconds * 1e3 / max(1, summary.frames_scored), 3),
            "wall_overhead_fraction": round(1 - summary.model_ms_mean * summary.frames_scored / 1e3 / summary.wall_seconds, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="s", choices=["s", "m", "lite", "lite0"])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (default: all cores)")
    p.add_argument("--results", default=None)
    p.add_argument("--no-stream", action="store_true")
    p.add_argument("--int8", action="store_true", help="also time edgead's INT8 export (CPU recipe, teacher fp32 "
                   "unless --int8-teacher) in the same alternating loop")
    p.add_argument("--int8-teacher", action="store_true", help="with --int8: quantize the teacher too")
    p.add_argument("--calib", default=None, help="with --int8: good images for the Q/DQ scales "
                   "(default: 32 generated synthetic parts)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import os

    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["EDGEAD_THREADS"] = str(args.threads)
    from export.onnx_export import export_onnx
    from runtime.bench import percentiles, test_frame
    from runtime.model import Model

    work = Path(tempfile.mkdtemp(prefix="edgead_speed_"))
    ckpt = checkpoint(args.variant, work / "ckpt.pt")
    onnx_path = export_onnx(ckpt, work / "model.onnx")
    blob = torch.load(ckpt, weights_only=True)
    from train.loop import load_checkpoint

    torch_model, _ = load_checkpoint(ckpt)
    eager = EagerBaseline(torch_model, blob["normalization"])
    edge = Model(onnx_path)
    edge8 = None
    if args.int8:
        from export.quantize import quantize_qdq

        calib = args.calib or synthetic_good_images(work / "calib", 32)
        edge8 = Model(quantize_qdq(onnx_path, work / "model_int8.onnx", calib, quantize_teacher=args.int8_teacher))
    frame = test_frame()
    jpeg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()

    def edge_e2e(model=edge):
        img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        p_ = model.predict([img])
        return p_.anomaly_map[0], float(p_.image_score[0]), bool(p_.is_ng[0])

    # same answer first
    am_e, sc_e, _ = eager(jpeg)
    am_o, sc_o, _ = edge_e2e()
    # eager resizes in RGB and edgead in BGR: identical pixels; differences are float rounding only
    agree = {"map_max_abs_diff": float(np.abs(am_e - am_o).max()), "score_abs_diff": abs(sc_e - sc_o)}
    for _ in range(3):
        eager(jpeg)
        edge_e2e()
        if edge8 is not None:
            edge_e2e(edge8)
    t_eager, t_edge, t_model, t_int8 = [], [], [], []
    prepared = edge.prepare([frame])
    for _ in range(args.iters):  # alternate A/B over the same frame
        t0 = time.perf_counter()
        eager(jpeg)
        t1 = time.perf_counter()
        edge_e2e()
        t2 = time.perf_counter()
        edge.infer(prepared)
        t3 = time.perf_counter()
        if edge8 is not None:
            edge_e2e(edge8)
            t_int8.append((time.perf_counter() - t3) * 1e3)
        t_eager.append((t1 - t0) * 1e3)
        t_edge.append((t2 - t1) * 1e3)
        t_model.append((t3 - t2) * 1e3)
    res = {
        "variant": args.variant, "gflop_per_image": round(count_gflops(build(args.variant)), 2),
        "threads": args.threads or os.cpu_count(),
        "torch_eager_end_to_end": percentiles(t_eager), "edgead_onnxruntime_end_to_end": percentiles(t_edge),
        "edgead_onnxruntime_model_only": percentiles(t_model), "provider": edge.provider,
        "speedup_end_to_end_p50": round(np.median(t_eager) / np.median(t_edge), 3),
        "edgead_fps_end_to_end": round(1e3 / np.median(t_edge), 2), "agreement": agree,
    }
    if edge8 is not None:
        res["edgead_int8_onnxruntime_end_to_end"] = percentiles(t_int8)
        res["int8_speedup_end_to_end_p50"] = round(float(np.median(t_eager) / np.median(t_int8)), 3)
        res["int8"] = {"teacher_quantized": args.int8_teacher, "calibration_images": args.calib or "generated",
                       "note": "speed of this network's INT8 graph; INT8 accuracy is measured on trained models by "
                               "benchmarks/int8_accuracy.py"}
    if not args.no_stream:
        video = line_video(work)
        res["stream_1080p"] = stream_overhead(onnx_path, video)
        if edge8 is not None:
            res["stream_1080p_int8"] = stream_overhead(edge8.path, video)
    suffix = ("_int8_all" if args.int8_teacher else "_int8") if args.int8 else ""
    path = write_result(f"runtime_vs_eager_{args.variant}{suffix}.json", res, args.results)
    print(json.dumps(res, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
