"""Work from FLOPs and bytes to a GPU floor, layer by layer (an analysis: no GPU needed, nothing timed).

    python -m benchmarks.gpu_roofline --variant s --batch 64

The issue's floor (76 GFLOP per image at 790 TFLOP/s = about 10,400 images/s) counts
arithmetic only. This traces the deployed graph (uint8 frames -> maps and scores, networks in
fp16, statistics fp32, as ``gpu_speed``'s fastest row runs it) with ``torch.export``, and for
every operator takes its FLOPs and the bytes it must move (its tensor inputs, weights included,
and its output, at the traced dtypes). Each operator's time is bounded below by
max(FLOPs / peak, bytes / bandwidth). Two sums:

- **unfused**: every operator reads and writes HBM (what eager PyTorch does);
- **fused**: elementwise operators, pooling and reductions cost nothing beyond the convolution or
  matmul they follow (what inductor or TensorRT can reach at best).

Peaks default to the H100 SXM figures used in the issue: 790 TFLOP/s dense fp16 (the issue's
number; NVIDIA's datasheet says 989) and 3.35 TB/s HBM3. The result is a prediction to compare
measured rows of ``benchmarks.gpu_speed`` against, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict

import torch

from benchmarks.common import write_result
from benchmarks.speed_models import ALL_NETWORKS, build

COMPUTE_OPS = {"conv2d", "convolution", "mm", "addmm", "bmm", "matmul", "linear"}
FREE_OPS = {"view", "_unsafe_view", "reshape", "permute", "transpose", "expand", "t", "unsqueeze", "squeeze",
            "alias", "detach", "slice", "select", "contiguous", "clone", "split", "split_with_sizes",
            "getitem", "_assert_tensor_metadata", "lift_fresh_copy",
            "dropout"}  # eval-mode dropout is the identity


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _meta(arg):
    """The traced value of a graph argument (a fake tensor for tensor nodes)."""
    if isinstance(arg, torch.fx.Node):
        return arg.meta.get("val")
    if isinstance(arg, (list, tuple)):
        return type(arg)(_meta(a) for a in arg)
    return arg


def _flops(op: str, args, out) -> float:
    if op in ("conv2d", "convolution"):
        x, w = args[0], args[1]
        gi = 6 if op == "conv2d" else 8
        groups = args[gi] if len(args) > gi else 1
        k = w.shape[2] * w.shape[3] * (x.shape[1] // groups)
        return 2.0 * out.numel() * k
    if op in ("mm", "addmm", "bmm", "matmul", "linear"):
        a, b = (args[1], args[2]) if op == "addmm" else (args[0], args[1])
        return 2.0 * out.numel() * a.shape[-1]
    return float(out.numel()) if isinstance(out, torch.Tensor) else 0.0


def _part(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in stack.values():
        for name in ("teacher", "student", "autoencoder", "smoothing"):  # smoothing: head.smoothing
            if path == name or path.startswith(name + ".") or f".{name}" in path:
                return name
    return "pre/post-processing"


def analyse(variant: str, batch: int, image_size: int = 256) -> list[dict]:
    """One row per operator of the deployed fp16 graph: part, op, GFLOP, MB moved."""
    model = build(variant, image_size).half_networks(ALL_NETWORKS).to(memory_format=torch.channels_last)
    frames = torch.zeros(batch, image_size, image_size, 3, dtype=torch.uint8)
    with torch.no_grad():
        prog = torch.export.export(model, (frames,))
    rows = []
    for node in prog.graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        op = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        if op in FREE_OPS:
            continue
        out = node.meta.get("val")
        outs = list(_tensors(out))
        if not outs:
            continue
        args = [_meta(a) for a in node.args]
        moved = sum(_nbytes(t) for t in _tensors(args)) + sum(_nbytes(t) for t in outs)
        rows.append({"part": _part(node), "op": op, "gflop": _flops(op, args, outs[0]) / 1e9, "mb": moved / 1e6,
                     "dtype": str(outs[0].dtype).replace("torch.", "")})
    return rows


def floors(rows: list[dict], batch: int, peak_tflops: float, bandwidth_tbs: float) -> dict:
    """Lower bounds on time per batch (ms) and the images/s they allow."""
    def bounds_ms(r) -> tuple[float, float]:
        """(compute, memory) time of one operator at the peaks."""
        return r["gflop"] / peak_tflops, r["mb"] / (bandwidth_tbs * 1e3)

    def t_ms(r, fused: bool) -> float:
        return 0.0 if fused and r["op"] not in COMPUTE_OPS else max(bounds_ms(r))
    total_gflop = sum(r["gflop"] for r in rows)
    res = {"gflop_per_image": total_gflop / batch,
           "arithmetic_only_ms": total_gflop / peak_tflops}
    for fused in (False, True):
        ms = sum(t_ms(r, fused) for r in rows)
        res[f"{'fused' if fused else 'unfused'}_ms"] = ms
    for k in ("arithmetic_only", "unfused", "fused"):
        res[f"{k}_images_per_s"] = batch * 1e3 / res[f"{k}_ms"]
    by = defaultdict(lambda: {"gflop": 0.0, "mb": 0.0, "ops": 0, "memory_bound_ops": 0, "unfused_ms": 0.0})
    for r in rows:
        g = by[(r["part"], r["op"] if r["op"] in COMPUTE_OPS else "other")]
        g["gflop"] += r["gflop"]
        g["mb"] += r["mb"]
        g["ops"] += 1
        compute, memory = bounds_ms(r)
        g["memory_bound_ops"] += int(memory > compute)
        g["unfused_ms"] += t_ms(r, False)
    res["by_part"] = [{"part": p, "kind": k, **{kk: round(vv, 4) if isinstance(vv, float) else vv for kk, vv in v.items()}}
                      for (p, k), v in sorted(by.items(), key=lambda kv: -kv[1]["unfused_ms"])]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="s", choices=["s", "m", "lite", "lite0"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--peak-tflops", type=float, default=790.0, help="dense fp16 tensor-core peak")
    p.add_argument("--bandwidth-tbs", type=float, default=3.35, help="HBM bandwidth")
    p.add_argument("--results", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    out = {"variant": args.variant, "peak_tflops": args.peak_tflops, "bandwidth_tbs": args.bandwidth_tbs,
           "note": "analysis of the traced graph, not a measurement; fp16 networks, fp32 statistics", "batches": {}}
    for b in args.batch:
        f = floors(analyse(args.variant, b), b, args.peak_tflops, args.bandwidth_tbs)
        out["batches"][str(b)] = f
        logging.info("batch %d: %.1f GFLOP/image; floors arithmetic %.0f, fused %.0f, unfused %.0f images/s", b,
                     f["gflop_per_image"], f["arithmetic_only_images_per_s"], f["fused_images_per_s"],
                     f["unfused_images_per_s"])
    path = write_result(f"gpu_roofline_{args.variant}.json", out, args.results)
    print(json.dumps({b: {k: round(v, 3) for k, v in f.items() if not isinstance(v, list)}
                      for b, f in out["batches"].items()}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
