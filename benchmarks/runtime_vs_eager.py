"""edgead's ONNX Runtime path vs the same model in PyTorch eager with Python pre/post-processing.

    python -m benchmarks.runtime_vs_eager --variant s      # EfficientAD-S + PUAD (paper network)
    python -m benchmarks.runtime_vs_eager --variant lite   # edgead real-time model

Both sides do the same work per camera frame: JPEG bytes of a 1920x1080 frame -> decode ->
resize -> normalize -> teacher/student/autoencoder -> quantile normalization -> map smoothing
-> map upsampling -> Mahalanobis -> PUAD score -> OK/NG. The eager side is written the way research
code deploys (one cv2.resize, torch tensors, Python-side steps, numpy Mahalanobis); the edgead side
is the runtime's resize and one fused ONNX graph fed uint8 frames. Before timing, the eager
post-processing must agree with the graph's on the same pixels (``check_parity``; the run stops
otherwise). The two run alternately over the same frames, in one process, so machine noise hits
both alike. Also measures the stream's own overhead on a 1920x1080 video.
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

log = logging.getLogger(__name__)

# eager and graph must give the same answer before their speeds are compared: |score difference| and
# |map difference| at most this fraction of max(1, the graph's magnitude) (both fp32; observed 5e-7 with --variant lite0 on CPU)
PARITY_TOLERANCE = 1e-3


class EagerBaseline:
    """The model as a research repo would run it: PyTorch eager, Python-side pre/post-processing.

    ``load`` decodes and resizes as such code does (one ``cv2.resize`` INTER_AREA step, in RGB);
    ``score`` writes the post-network steps out again (numpy Mahalanobis and score mix) on purpose:
    that is the deployment style being compared. ``check_parity`` asserts that ``score`` still
    computes what the exported graph computes, so this copy cannot drift silently.
    """

    def __init__(self, model, threshold: float):
        self.m = model.eval()
        self.h, self.w = model.cfg.image_size
        self.mean = torch.tensor(model.cfg.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(model.cfg.std).view(1, 3, 1, 1)
        head = model.head
        consts = head.constants()
        self.map_scale = torch.from_numpy(consts["map_scale"])
        self.map_shift = torch.from_numpy(consts["map_shift"])
        self.mu = consts["gaussian_mean"].astype(np.float64)
        w = consts["gaussian_whitener"].astype(np.float64)
        self.precision = w @ w.T
        self.center = consts["score_center"].astype(np.float64)
        self.weight = consts["score_weight"].astype(np.float64)
        self.smoothing = head.smoothing  # separable Gaussian conv at grid resolution (identity when sigma is 0)
        self.pad = head.pad_cells
        self.threshold = float(threshold)

    def load(self, jpeg: bytes) -> np.ndarray:
        """JPEG bytes -> uint8 RGB [h,w,3] at the model's input size."""
        img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        return cv2.resize(rgb, (self.w, self.h), interpolation=cv2.INTER_AREA)

    @torch.no_grad()
    def score(self, rgb: np.ndarray):
        """uint8 RGB [h,w,3] -> (anomaly map float32 [h,w], image score, NG)."""
        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 255.0
        x = (x - self.mean) / self.std
        m, c = self.m, self.m.channels
        t = (m.teacher(x) - m.teacher_mean) / m.teacher_std
        s = m.student(x)
        a = m.autoencoder(x)
        maps = torch.cat([torch.mean((t - s[:, :c]) ** 2, dim=1, keepdim=True),
                          torch.mean((a - s[:, c:]) ** 2, dim=1, keepdim=True)], 1)
        amap = torch.sum(maps * self.map_scale + self.map_shift, dim=1, keepdim=True)  # quantile normalization
        amap = self.smoothing(amap)
        map_score = float(amap.max())
        if self.pad:
            amap = F.pad(amap, (self.pad,) * 4)
        amap = F.interpolate(amap, size=(self.h, self.w), mode="bilinear")
        f = torch.mean(s[:, :c], dim=(2, 3))[0].numpy().astype(np.float64) - self.mu
        gaussian_score = float(np.sqrt(f @ self.precision @ f + 1e-12))
        d = (np.array([map_score, gaussian_score]) - self.center) * self.weight  # PUAD's gated sum
        score = float(d[0] + max(d[1], 0.0))
        return amap[0, 0].numpy(), score, score >= self.threshold

    def __call__(self, jpeg: bytes):
        return self.score(self.load(jpeg))


def check_parity(eager: EagerBaseline, edge, frames: list[np.ndarray]) -> dict:
    """The eager arithmetic vs the deployed graph from identical pixels; raises if they disagree.

    ``edge``: a ``runtime.model.Model``; frames: BGR camera frames. Both sides get the runtime's
    prepared pixels, so any difference is the post-network copy's (or float rounding)."""
    map_diff, score_diff, worst = 0.0, 0.0, 0.0
    for frame in frames:
        batch = edge.prepare([frame])
        pred = edge.to_prediction(edge.infer(batch))
        am_o, sc_o, ng_o = pred.anomaly_map[0], float(pred.image_score[0]), bool(pred.is_ng[0])
        am_e, sc_e, ng_e = eager.score(batch[0][..., ::-1])
        md, sd = float(np.abs(am_e - am_o).max()), abs(sc_e - sc_o)
        map_diff, score_diff = max(map_diff, md), max(score_diff, sd)
        rel = max(md / max(1.0, float(np.abs(am_o).max())), sd / max(1.0, abs(sc_o)))
        worst = max(worst, rel)
        if rel > PARITY_TOLERANCE or (ng_e != ng_o and abs(sc_o - eager.threshold) > sd):
            raise RuntimeError(f"eager baseline and exported graph disagree on the same pixels (map diff {md:.3g}, "
                               f"score {sc_e:.6g} vs {sc_o:.6g}, NG {ng_e} vs {ng_o}); the baseline's copy of the "
                               "head arithmetic (EagerBaseline.score) no longer matches train/models/head.py - fix it")
    return {"frames": len(frames), "map_max_abs_diff": map_diff, "score_max_abs_diff": score_diff,
            "max_relative_diff": worst, "tolerance": PARITY_TOLERANCE}


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
    p.add_argument("--parity-frames", type=int, default=4,
                   help="conveyor frames (besides the timed frame) on which eager and graph must agree first")
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
    from train.loop import load_checkpoint

    torch_model, _ = load_checkpoint(ckpt)
    edge = Model(onnx_path)
    eager = EagerBaseline(torch_model, edge.threshold)
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

    # same answer first: the eager arithmetic must match the graph's from identical pixels, on the timed
    # frame and a few conveyor frames; then, end to end, the two resizes (eager: one INTER_AREA step, edgead:
    # the runtime's two-step area filter) differ by pixel rounding only (reported, not asserted)
    from runtime.synthetic import conveyor_frames

    frames = [frame] + [f for f, _ in conveyor_frames(args.parity_frames, size=512, seed=2, frame_size=(1920, 1080))]
    agree = check_parity(eager, edge, frames)
    log.info("eager and graph agree on %d frames (max relative difference %.2e)", agree["frames"],
             agree["max_relative_diff"])
    am_e, sc_e, _ = eager(jpeg)
    am_o, sc_o, _ = edge_e2e()
    agree["end_to_end_with_own_resize"] = {"map_max_abs_diff": float(np.abs(am_e - am_o).max()),
                                           "score_abs_diff": abs(sc_e - sc_o)}
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
