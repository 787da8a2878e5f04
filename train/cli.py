"""`python -m train --data DIR [DIR ...] --out DIR [--model NAME | --size s|m|lite] [--steps N] [--device cuda|cpu]`."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from calibration.fitting import DEFAULT_PUAD_GATE, parse_gate
from runtime.artifact import ArtifactError
from runtime.dataset import DatasetError, class_folders

log = logging.getLogger(__name__)

SIZES = {"lite": "efficientad_lite", "s": "efficientad_s", "m": "efficientad_m"}


def add_model_options(p: argparse.ArgumentParser) -> None:
    """The flags that choose the network; shared by ``python -m train`` and the training benchmarks."""
    p.add_argument("--size", choices=sorted(SIZES), default="lite",
                   help="lite: real-time model, frozen EfficientNet-Lite teacher (default); s/m: the paper's PDN students")
    p.add_argument("--teacher", choices=["lite0", "lite2", "pdn_s", "pdn_m"], default=None,
                   help="teacher (default lite2: frozen ImageNet EfficientNet-Lite2 features; pdn_* are untrained PDNs, "
                        "for speed comparisons only)")
    p.add_argument("--teacher-stages", "--teacher-indices", dest="teacher_stages", type=int, nargs="+", default=None,
                   choices=range(5), metavar="K",
                   help="EfficientNet-Lite stages the teacher uses (default 2 3; 1 = stride 4, 2 = stride 8, 3 = stride 16)")
    p.add_argument("--teacher-pool", type=int, default=None, metavar="K",
                   help="averaging window of the teacher features in grid cells (default 3; 1 = off: sharper maps, "
                        "see benchmarks/README.md)")
    p.add_argument("--student-stride", type=int, choices=[4, 8], default=None,
                   help="--size lite only: 8 (default, 32x32 map at 256 px) or 4 (64x64 map: finer localization, "
                        "about 2x the training step time; pair with --teacher-stages 1 2 3)")
    p.add_argument("--student-width", type=int, default=None, help="--size lite only: student width (default 128)")


def parse_key_values(items, bad_item: str) -> dict:
    """``KEY=VALUE`` strings -> keyword arguments (values parsed as JSON when they parse).

    bad_item: the one-line error for an item without '=' (``{item!r}`` is filled in)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(bad_item.format(item=item))
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def parse_model_args(items: list[str] | None) -> dict:
    """``--model-arg KEY=VALUE`` pairs -> keyword arguments (values parsed as JSON when they parse)."""
    return parse_key_values(items, "--model-arg {item!r}: write KEY=VALUE, e.g. coreset_ratio=0.1")


def model_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments of ``create_model`` for the flags of ``add_model_options``; ValueError on a bad mix."""
    extra = parse_model_args(getattr(args, "model_arg", None))
    if getattr(args, "model", None) and not args.model.startswith("efficientad"):
        given = [f for f in ("teacher", "teacher_stages", "teacher_pool", "student_stride", "student_width")
                 if getattr(args, f, None) is not None]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} is an EfficientAD option; for --model {args.model} "
                             "use --model-arg KEY=VALUE")
        return extra
    return {**_efficientad_kwargs(args), **extra}


def _efficientad_kwargs(args: argparse.Namespace) -> dict:
    if args.size == "lite" and args.teacher not in (None, "lite0", "lite2"):
        raise ValueError("--size lite takes an EfficientNet-Lite teacher (lite0 or lite2)")
    if args.student_stride and args.size != "lite":
        raise ValueError("--student-stride is for --size lite (the paper's PDN students have a fixed grid)")
    kw = {"teacher": args.teacher} if args.teacher else {} if args.size == "lite" else {"teacher": "lite2"}
    options = {"teacher_out_indices": tuple(args.teacher_stages) if args.teacher_stages else None,
               "teacher_pool": args.teacher_pool, "student_stride": args.student_stride,
               "student_width": args.student_width}
    kw.update({k: v for k, v in options.items() if v is not None})  # a given 0 reaches the model's own check
    return kw


def build_parser() -> argparse.ArgumentParser:
    from .loop import PAPER_STEPS

    from .models import list_models

    p = argparse.ArgumentParser(prog="python -m train", description="Train an anomaly model on good images only "
                                "(MVTec layout: DIR/train/good). Writes OUT/checkpoint.pt for `python -m export`.")
    p.add_argument("--data", required=True, nargs="+", metavar="DIR",
                   help="category folder holding train/good (and optionally test/), or a parent of such folders; several "
                        "classes = one model for several product classes (each class's threshold is fitted on its held-out "
                        "images; refit one with `python -m calibration fit --class NAME`)")
    p.add_argument("--model", choices=list_models(), default=None,
                   help="model to train (default: efficientad_lite, or the one --size names)")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="a family option (repeatable), e.g. --model-arg coreset_ratio=0.1")
    p.add_argument("--fit", choices=["stretch", "letterbox", "center_crop"], default="stretch",
                   help="how images of another aspect are fitted to the input size (recorded in the artifact)")
    p.add_argument("--out", required=True, help="output folder for checkpoint.pt and train_log.jsonl")
    add_model_options(p)
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps (default: the family's; EfficientAD: the paper's {PAPER_STEPS})")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: the family's; EfficientAD: 1)")
    p.add_argument("--image-size", default=None, metavar="N|WxH",
                   help="N: about NxN pixels at the training images' aspect (multiples of 32, e.g. 416x160 for "
                        "2.5:1 parts at N=256); WxH: exactly this (default: the model's own, e.g. 256 for "
                        "efficientad_lite, 384 for patchcore_lite)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--puad-weight", type=float, default=0.5, help="weight of the unpicturable (Gaussian) score")
    p.add_argument("--puad-gate", type=parse_gate, default=DEFAULT_PUAD_GATE, metavar="Z|none",
                   help=f"the Gaussian score counts only above this z on good images (default {DEFAULT_PUAD_GATE:g}); "
                        "none: plain sum")
    p.add_argument("--map-blur", default=None, metavar="SIGMA|auto",
                   help="anomaly-map smoothing, Gaussian sigma in px at 256 px (default 8; 0 = off); auto: choose "
                        "among 0-12 on defects painted on the validation images (no defect images needed)")
    p.add_argument("--target-fpr", type=float, default=0.01, help="false-positive rate of the first OK/NG threshold")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if present")
    p.add_argument("--amp", action="store_true", help="bf16 autocast: on CUDA, and ~2x faster on CPUs with AVX512-BF16/AMX")
    p.add_argument("--evaluate", action="store_true", help="after training, report metrics on DATA/test")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def training_schedule(model: str, steps: int | None, batch_size: int | None, n_classes: int = 1) -> tuple[int, int]:
    """--steps / --batch-size, each falling back to the model family's own schedule (GeneralAD trains 600 x 8,
    cross-class 300 episodes, UniAD 1000 x 8 per class), else the EfficientAD paper's 70,000 steps at batch 1."""
    from .loop import PAPER_STEPS
    from .models.registry import default_schedule

    d_steps, d_batch = default_schedule(model, n_classes) or (PAPER_STEPS, 1)
    return (d_steps if steps is None else steps), (d_batch if batch_size is None else batch_size)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .loop import TrainConfig, load_checkpoint, parse_map_blur, train

    try:
        kw = model_kwargs(args)
        map_blur = None if args.map_blur is None else parse_map_blur(args.map_blur)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        folders = [str(p) for p in class_folders(args.data)]
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(folders) != len(args.data):
        log.info("training on %d class folders: %s", len(folders), ", ".join(Path(f).name for f in folders))
    data = folders[0] if len(folders) == 1 else folders
    model = args.model or SIZES[args.size]
    steps, batch = training_schedule(model, args.steps, args.batch_size, len(folders))
    cfg = TrainConfig(data=data, out=args.out, model=model, image_size=args.image_size,
                      fit=args.fit, steps=steps, batch_size=batch, device=args.device, seed=args.seed, puad_weight=args.puad_weight,
                      puad_gate=args.puad_gate, target_fpr=args.target_fpr, amp=args.amp, model_kwargs=kw,
                      map_blur=map_blur)
    try:
        ckpt = train(cfg, resume=args.resume)
        if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 wrote the checkpoint and reports it
            return 0
        if args.evaluate:
            from .evaluate import evaluate_model

            m, _blob = load_checkpoint(ckpt)
            for d in folders:
                print(json.dumps({d: evaluate_model(m, d, args.device, _blob["thresholds"]["image"], args.fit)}, indent=2))
    except (DatasetError, ArtifactError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(ckpt)
    return 0
