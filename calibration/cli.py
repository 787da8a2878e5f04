"""`python -m calibration fit|report ...`: recalibrate a deployed model at the line, without torch."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from runtime.artifact import ArtifactError
from runtime.dataset import DatasetError

from .fitting import KEEP_GATE, CalibrationError, parse_gate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m calibration", description="Fit the map quantiles, the Gaussian "
                                "(where the model has one), the score normalization and the OK/NG threshold of a "
                                "deployed model from good images (no torch needed).")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="refit all constants and rewrite the model + sidecar (backup kept as .bak)")
    f.add_argument("--model", required=True, help="model.onnx or model.engine (sidecar next to it)")
    f.add_argument("--good", required=True, help="folder of good images, a video file, or camera:N")
    f.add_argument("--defects", help="folder of labelled defect images: threshold at F1-max instead of target FPR")
    f.add_argument("--target-fpr", type=float, default=0.01, help="false-positive rate on good images (default 0.01)")
    f.add_argument("--max-images", type=int, help="use at most this many images per source")
    f.add_argument("--puad-weight", type=float, help="weight of the unpicturable score (default: keep the model's)")
    f.add_argument("--puad-gate", type=parse_gate, default=KEEP_GATE, metavar="Z|none",
                   help="z above which the unpicturable score counts; none: plain sum (default: keep the model's)")
    f.add_argument("--class", dest="class_name", metavar="NAME",
                   help="multi-class model: fit only this product class's threshold from its good images")
    f.add_argument("--any-aspect", action="store_true",
                   help="accept images whose aspect differs from the training images' (a deliberate new view)")
    f.add_argument("--dry-run", action="store_true", help="compute and print, change nothing")
    r = sub.add_parser("report", help="score images with the model as deployed; statistics and a histogram PNG")
    r.add_argument("--model", required=True)
    r.add_argument("--good", required=True, help="folder of good images, a video file, or camera:N")
    r.add_argument("--defects", nargs="+", metavar="DIR",
                   help="folder(s) of defect images; each folder's name is its defect type (misses counted per type)")
    r.add_argument("--class", dest="class_name", metavar="NAME", help="multi-class model: use this class's threshold")
    r.add_argument("--max-images", type=int)
    r.add_argument("--plot", help="write a histogram PNG of good vs defect scores here")
    r.add_argument("--json", help="write the report JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.cmd == "fit":
            from .field import calibrate, summary

            res = calibrate(args.model, args.good, args.defects, args.target_fpr, args.max_images, args.puad_weight,
                            dry_run=args.dry_run, puad_gate=args.puad_gate, class_name=args.class_name,
                            any_aspect=args.any_aspect)
            print(json.dumps(summary(res), indent=2))
        else:
            from .report import report

            rep = report(args.model, args.good, args.defects, args.max_images, args.plot, args.json, args.class_name)
            print(json.dumps(rep, indent=2))
            print(f"verdict at threshold {rep['threshold']:.4g}: {rep['verdict']}", file=sys.stderr)
    except (CalibrationError, ArtifactError, DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
