"""`python -m export onnx|torch|tensorrt|triton ...`: checkpoint -> deployable artifact (+ sidecar)."""
from __future__ import annotations

import argparse
import logging
import sys

from runtime.artifact import ArtifactError
from runtime.backends.base import BackendUnavailable


def _batch(v: str) -> int | str:
    if v == "dynamic":
        return v
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch {v!r}: give a number or 'dynamic'")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description="Turn a training checkpoint into a deployable "
                                "model: one graph from uint8 frames to map and scores, plus its JSON sidecar.")
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("onnx", help="checkpoint -> model.onnx (+ model.onnx.json)")
    o.add_argument("checkpoint")
    o.add_argument("--out", required=True)
    o.add_argument("--fp16", action="store_true", help="fp16 student and autoencoder (teacher and statistics stay fp32)")
    o.add_argument("--fp16-teacher", action="store_true", help="with --fp16: teacher in fp16 too (faster on GPUs; "
                   "check parity on your data, the teacher's std normalization amplifies rounding)")
    o.add_argument("--batch", type=_batch, default=1, help="fixed batch size or 'dynamic' (default 1)")
    o.add_argument("--opset", type=int, default=17)
    o.add_argument("--no-simplify", action="store_true")
    o.add_argument("--int8", action="store_true", help="also write OUT with Q/DQ nodes (explicit INT8) from --calib-images")
    o.add_argument("--calib-images", help="folder of good images for INT8 Q/DQ calibration")
    o.add_argument("--int8-target", choices=["cpu", "tensorrt"], default="cpu",
                   help="with --int8: cpu = uint8 activations for ONNX Runtime on CPUs (default, fastest there); "
                   "tensorrt = symmetric int8, the form TensorRT's explicit quantization accepts")
    o.add_argument("--int8-teacher", action="store_true", help="with --int8: quantize the teacher too (faster on CPU; "
                   "check accuracy, the teacher's std normalization amplifies rounding)")
    t = sub.add_parser("torch", help="checkpoint -> model.pt2 (torch.export) for the runtime's torch backend")
    t.add_argument("checkpoint")
    t.add_argument("--out", required=True)
    t.add_argument("--batch", type=_batch, default=1)
    t.add_argument("--fp16", action="store_true", help="fp16 student and autoencoder (for GPUs)")
    t.add_argument("--fp16-teacher", action="store_true", help="with --fp16: teacher in fp16 too")
    r = sub.add_parser("tensorrt", help="model.onnx -> model.engine (needs TensorRT on this machine)")
    r.add_argument("onnx")
    r.add_argument("--out", required=True)
    r.add_argument("--fp16", action="store_true")
    r.add_argument("--int8", action="store_true", help="the ONNX must be a Q/DQ export (onnx --int8)")
    r.add_argument("--calib-images", help="quantize the ONNX first with these images (implies --int8)")
    r.add_argument("--workspace", type=float, default=4.0, help="builder workspace in GB")
    r.add_argument("--max-batch", type=int, default=32)
    tr = sub.add_parser("triton", help="model.onnx -> Triton model repository (REPO/NAME/config.pbtxt, REPO/NAME/1/...)")
    tr.add_argument("onnx", help="the .onnx artifact (its sidecar next to it travels along)")
    tr.add_argument("--out", required=True, help="repository folder (created; other models in it are left alone)")
    tr.add_argument("--name", help="model name on the server (default: the file's stem)")
    tr.add_argument("--max-batch", type=int, default=8, help="max_batch_size for Triton's dynamic batcher (default 8)")
    tr.add_argument("--instances", type=int, default=1, help="model instances (instance_group count, default 1); "
                    "python variant: they share the server's cores, cores // instances ONNX Runtime threads each "
                    "(on CPU give one per core with --max-batch 2 --queue-delay-us 0, see docs/scaling_out.md)")
    tr.add_argument("--backend", choices=["onnxruntime", "python"], default="onnxruntime",
                    help="onnxruntime: platform onnxruntime_onnx (production, official container); python: the same "
                    "ONNX run by ONNX Runtime inside Triton's python backend (servers without the ORT backend)")
    tr.add_argument("--kind", choices=["gpu", "cpu"], help="instance kind (default gpu for onnxruntime, cpu for python)")
    tr.add_argument("--engine", help="also serve this TensorRT engine (built from ONNX with `export tensorrt` on the "
                    "serving GPU) as platform tensorrt_plan instead of the ONNX")
    tr.add_argument("--queue-delay-us", type=int, default=500,
                    help="dynamic batcher: longest wait for more requests, microseconds (default 500)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.cmd == "onnx":
            from .onnx_export import export_onnx

            if args.int8 and not args.calib_images:
                raise ArtifactError("--int8 needs --calib-images DIR (good images for the Q/DQ scales)")
            if args.int8:
                from pathlib import Path

                from .quantize import quantize_qdq

                fp32 = Path(args.out).with_name(Path(args.out).stem + ".fp32.onnx")
                export_onnx(args.checkpoint, fp32, batch=args.batch, opset=args.opset, simplify=not args.no_simplify)
                out = quantize_qdq(fp32, args.out, args.calib_images, quantize_teacher=args.int8_teacher,
                                   target=args.int8_target)
                # int8 noise moves the pooled features: refit the Gaussian and quantiles on the quantized graph
                from calibration.field import calibrate

                calibrate(out, args.calib_images, backup=False)
            else:
                out = export_onnx(args.checkpoint, args.out, fp16=args.fp16, batch=args.batch, opset=args.opset,
                                  simplify=not args.no_simplify, fp16_teacher=args.fp16_teacher)
        elif args.cmd == "torch":
            from .onnx_export import export_torch_program

            out = export_torch_program(args.checkpoint, args.out, batch=args.batch, fp16=args.fp16,
                                       fp16_teacher=args.fp16_teacher)
        elif args.cmd == "triton":
            from .triton_repo import write_repository

            out = write_repository(args.onnx, args.out, name=args.name, backend=args.backend, max_batch=args.max_batch,
                                   instances=args.instances, kind=f"KIND_{args.kind.upper()}" if args.kind else None,
                                   queue_delay_us=args.queue_delay_us, engine=args.engine)
        else:
            from .tensorrt_build import build_engine

            src = args.onnx
            if args.calib_images:
                from pathlib import Path

                from .quantize import quantize_qdq

                src = quantize_qdq(args.onnx, Path(args.out).with_suffix(".qdq.onnx"), args.calib_images,
                                   target="tensorrt")
                args.int8 = True
            out = build_engine(src, args.out, fp16=args.fp16, int8=args.int8, workspace_gb=args.workspace,
                               max_batch=args.max_batch)
    except (ArtifactError, BackendUnavailable, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0
