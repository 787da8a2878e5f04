"""GPU latency/throughput of EfficientAD-S + PUAD, end to end from uint8 frames on the GPU to scores and maps.

    python -m benchmarks.gpu_speed --variant s

Steps, each measured (CUDA events, median of many replays) and checked against the fp32
eager outputs: fp32 eager NCHW -> fp16 networks -> + channels-last -> + CUDA graph ->
+ torch.compile (inductor) inside the CUDA graph; and edgead's shipped torch backend
(``export torch`` .pt2 + CUDA graph). Prints a table, writes benchmarks/results/gpu_speed_<variant>.json.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import write_result
from benchmarks.speed_models import ALL_NETWORKS, build, checkpoint, count_gflops

log = logging.getLogger(__name__)
KEYS = ("anomaly_map", "map_score", "gaussian_score", "image_score")


def timed(fn, x, iters: int = 50, warmup: int = 10) -> float:
    """Median milliseconds per call, CUDA events around each call."""
    for _ in range(warmup):
        fn(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(x)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def graphed(fn, example):
    """Capture fn(example) in a CUDA graph; returns a callable that copies its input in and replays."""
    static_in = example.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(static_in)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = fn(static_in)

    def run(x):
        static_in.copy_(x)
        g.replay()
        return static_out
    return run


def max_err(out: dict, ref: dict) -> float:
    """Largest error of the decision outputs (by name) relative to the fp32 eager reference."""
    errs = []
    for k in KEYS:
        r = ref[k].float()
        errs.append(float((out[k].float() - r).abs().max() / max(1.0, float(r.abs().max()))))
    return max(errs)


def eager_steps(args, frames, refs, add) -> None:
    """fp32 -> tf32 -> fp16 -> channels-last -> CUDA graph, eager."""
    dev = torch.device("cuda")
    fp32 = build(args.variant).to(dev).eval()
    with torch.inference_mode():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        for b, x in frames.items():
            add("tf32 eager NCHW", b, timed(fp32, x), max_err(fp32(x), refs[b]))
        half = build(args.variant).to(dev).eval().half_networks(ALL_NETWORKS)
        for b, x in frames.items():
            add("fp16 networks eager", b, timed(half, x), max_err(half(x), refs[b]))
        half_cl = half.to(memory_format=torch.channels_last)
        for b, x in frames.items():
            add("fp16 + channels-last eager", b, timed(half_cl, x), max_err(half_cl(x), refs[b]))
        for b, x in frames.items():
            g = graphed(half_cl, x)
            add("fp16 + channels-last + CUDA graph", b, timed(g, x), max_err(g(x), refs[b]))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="s", choices=["s", "m", "lite", "lite0"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-mode", default="default", choices=["default", "max-autotune-no-cudagraphs"],
                   help="inductor mode of the compiled row; max-autotune times Triton and cuDNN kernels per "
                        "convolution (slow to compile; the CUDA graph is captured here either way)")
    p.add_argument("--backend-only", action="store_true", help="only the shipped edgead torch-backend rows")
    p.add_argument("--results", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    size = 256
    gflop = count_gflops(build(args.variant))
    rows = []

    def add(step, b, ms, err, note=""):
        rows.append({"step": step, "batch": b, "ms": round(ms, 4), "images_per_s": round(b * 1e3 / ms, 1),
                     "max_rel_err_vs_fp32": round(err, 6), "note": note})
        log.info("%-38s b=%-3d %8.3f ms %9.1f img/s err %.2e", step, b, ms, b * 1e3 / ms, err)
        write_result(f"gpu_speed_{args.variant}.json", {"variant": args.variant, "gflop_per_image": round(gflop, 2),
                                                         "rows": rows, "partial": True}, args.results)

    frames = {b: torch.randint(0, 256, (b, size, size, 3), dtype=torch.uint8, device=dev) for b in args.batches}
    fp32 = build(args.variant).to(dev).eval()
    refs = {}
    with torch.inference_mode():
        for b, x in frames.items():
            refs[b] = {k: v.clone() for k, v in fp32(x).items()}
            if not args.backend_only:
                add("fp32 eager NCHW", b, timed(fp32, x), 0.0)
    if not args.backend_only:
        eager_steps(args, frames, refs, add)
    compiled_ok = False
    if not args.no_compile and not args.backend_only:
        try:
            half_cl = build(args.variant).to(dev).eval().half_networks(ALL_NETWORKS).to(memory_format=torch.channels_last)
            mode = None if args.compile_mode == "default" else args.compile_mode
            comp = torch.compile(half_cl, dynamic=False, mode=mode)
            with torch.inference_mode():
                for b, x in frames.items():
                    t0 = time.time()
                    comp(x)
                    log.info("compiled batch %d in %.0fs", b, time.time() - t0)
                    g = graphed(comp, x)
                    add(f"fp16 + CL + torch.compile{f' ({mode})' if mode else ''} + CUDA graph", b, timed(g, x),
                        max_err(g(x), refs[b]))
            compiled_ok = True
        except Exception as e:  # inductor problems must not lose the other numbers
            log.warning("torch.compile step failed: %s", str(e).splitlines()[0][:200])
    # edgead's shipped path: export torch (.pt2, fp16 networks) -> runtime TorchBackend (CUDA graph)
    from export.onnx_export import export_torch_program
    from runtime.artifact import read_sidecar
    from runtime.backends.torch_backend import TorchBackend

    work = Path(tempfile.mkdtemp())
    ck = checkpoint(args.variant, work / "ck.pt")
    for b, x in frames.items():
        pt2 = export_torch_program(ck, work / f"m{b}.pt2", batch=b, fp16=True, fp16_teacher=True)
        comp = not args.no_compile
        be = TorchBackend(str(pt2), read_sidecar(pt2), device="cuda", cuda_graph=True, compile=comp)
        add(f"edgead torch backend (.pt2 fp16 CL{' + compile' if comp else ''} + CUDA graph)", b,
            timed(be.infer_tensor, x), max_err(be.infer_tensor(x), refs[b]))
    res = {"variant": args.variant, "gflop_per_image": round(gflop, 2), "image_size": size, "rows": rows,
           "compile_ok": compiled_ok,
           "floor_note": "arithmetic floor ~ gflop / 790 TFLOP/s (H100/H200 dense bf16/fp16 peak as quoted in the brief)"}
    path = write_result(f"gpu_speed_{args.variant}.json", res, args.results)
    print(f"{'step':42s} {'batch':>5s} {'ms':>9s} {'img/s':>10s} {'err':>9s}")
    for r in rows:
        print(f"{r['step']:42s} {r['batch']:5d} {r['ms']:9.3f} {r['images_per_s']:10.1f} {r['max_rel_err_vs_fp32']:9.2e}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
