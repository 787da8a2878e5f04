"""Every given model family on every given MVTec-layout dataset, with the same metrics; one JSON.

    nice -n 10 python -m benchmarks.families --models patchcore_lite \\
        --data ../shared/data/mvtec_ad/bottle ../shared/data/mvtec_ad/screw ../shared/data/mvtec_ad/transistor

A model is ``NAME`` or ``NAME:KEY=VALUE,KEY=VALUE`` (family options, e.g.
``patchcore_lite:memory_size=1024``), so a sweep is several specs of one model. Per (model, dataset):
fit on train/good (``train.loop.train``: the family's fit + the shared calibration) and its wall
time; the standard metrics on the test split (``train.evaluate.evaluate_model``: image / pixel
AUROC, AUPRO, F1-max per score); the exported fp32 ONNX timed on this CPU through the runtime
(ONNX Runtime, batch 1, model only and end to end from a JPEG camera frame, ``runtime.bench``).
Also per row, ``painted_validation``: the same metrics on the held-out validation images plus defects
painted on them (``calibration.synthetic_defects``), for the map score and the image score -- the labelled
set a setting may be chosen on (the test split only reports).
Settings are never chosen on the test split here: this only measures.
``--reference FILE``: copy metrics of earlier result files (e.g. EfficientAD runs too slow to
repeat) into the JSON beside the new rows, labelled as such.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from collections.abc import Container
from pathlib import Path

from benchmarks.common import write_result

log = logging.getLogger("benchmarks.families")


def parse_spec(spec: str) -> tuple[str, dict]:
    """'name' or 'name:k=v,k=v' -> (name, kwargs); values parsed as JSON when they parse (a list value keeps its
    commas: 'generalad_lite:graded_range=[0.2,8],graded_saturation=8')."""
    from train.cli import parse_key_values

    name, _, rest = spec.partition(":")
    bad = f"model spec {spec!r}: write NAME:KEY=VALUE,KEY=VALUE".replace("{", "{{").replace("}", "}}")
    return name, parse_key_values(filter(None, re.split(r",(?![^\[]*\])", rest)), bad)


def cpu_speed(onnx_path: Path, iters: int) -> dict:
    """ONNX Runtime on this CPU, batch 1: model-only and end-to-end ms (``runtime.bench``)."""
    from runtime.bench import bench_model, test_frame
    from runtime.model import Model

    m = Model(onnx_path, backend="onnxruntime", device="cpu")
    try:
        r = bench_model(m, test_frame(), (1,), iters)["batches"]["1"]
    finally:
        m.close()
    return {"provider": m.provider, "model_only_ms_p50": r["model_only"]["p50_ms"],
            "end_to_end_ms_p50": r["end_to_end"]["p50_ms"], "end_to_end_fps": r["throughput_images_per_s"],
            "model_only_fps": r["model_only_images_per_s"], "iters": iters}


def painted_validation(model, cfg, threshold: float, per_image: int = 3) -> dict:
    """Metrics on the validation split's good images plus defects painted on them (structural proxies),
    per score: what a default may be chosen on, never the test split."""
    from train.loop import load_training_images
    from train.painted_validation import LIGHT_GAINS, painted_validation as score

    return score(model, load_training_images(cfg).val, per_image, cfg.seed, light_gains=LIGHT_GAINS,
                 threshold=threshold)


def run_one(spec: str, data: str, work: Path, args, taken: Container[str] = ()) -> dict:
    """One model on one class. ``taken``: work folders this run already used (two classes of one name, such as
    real and generated screw, must not overwrite each other's artifacts)."""
    from export.onnx_export import export_onnx
    from train.evaluate import evaluate_model
    from train.loop import TrainConfig, load_checkpoint, train

    name, kw = parse_spec(spec)
    tag = f"{Path(data).name}_{spec.replace(':', '_').replace(',', '_').replace('=', '-')}"
    out = work / tag
    if str(out) in taken:
        out = work / f"{Path(data).parent.name}_{tag}"
    cfg = TrainConfig(data=data, out=str(out), model=name, steps=args.steps, batch_size=args.batch_size,
                      image_size=args.image_size, device="cpu", seed=args.seed, amp=args.amp, model_kwargs=kw)
    t0 = time.perf_counter()
    ckpt = train(cfg)
    fit_s = time.perf_counter() - t0
    model, blob = load_checkpoint(ckpt)
    metrics = evaluate_model(model, data, "cpu", blob["thresholds"]["image"])
    painted = painted_validation(model, cfg, blob["thresholds"]["image"])
    onnx_path = export_onnx(ckpt, out / "model.onnx")
    row = {"model": name, "options": kw, "config": blob["config"], "data": str(data), "family": blob["family"],
           "image_size": list(model.cfg.image_size),
           "work_dir": str(out), "fit_wall_seconds": round(fit_s, 1), "train_facts": {k: v for k, v in blob["train"].items()
                                                                 if k.endswith("seconds") or k in ("memory_rows", "patches", "n_fit", "steps")},
           "gaussian": gaussian_decision(blob),
           "onnx_mb": round(onnx_path.stat().st_size / 2**20, 2),
           "metrics": metrics, "painted_validation": painted, "cpu": cpu_speed(onnx_path, args.iters), "load_average_after": os.getloadavg()}
    log.info("%s on %s: image AUROC %.4f, pixel %.4f, AUPRO %.4f; fit %.0fs; %.1f ms model-only",
             spec, Path(data).name, metrics["image_score"]["image_auroc"], metrics["image_score"]["pixel_auroc"],
             metrics["image_score"]["aupro"], fit_s, row["cpu"]["model_only_ms_p50"])
    return row


def gaussian_decision(blob: dict) -> dict | None:
    """What the first calibration did with a Gaussian score (None: the model has none): on or off, why, the
    measured layout share (calibration.layout) and the weight it got."""
    g = blob.get("gaussian") or {}
    if not g.get("dim"):
        return None
    return {"on": g.get("estimator") != "off", "layout": g.get("layout"), "off_reason": g.get("off_reason", ""),
            "puad_weight": (blob.get("score") or {}).get("puad_weight")}


def reference(path: str) -> dict:
    d = json.loads(Path(path).read_text())
    keep = ("command", "date", "data", "model", "steps", "batch_size", "train_seconds", "config", "metrics")
    return {"file": str(path), **{k: d[k] for k in keep if k in d}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.families", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, metavar="NAME[:K=V,...]")
    p.add_argument("--data", nargs="+", required=True, metavar="DIR", help="MVTec-layout class folders")
    p.add_argument("--steps", type=int, default=1500, help="training steps of families that train (ignored by memory banks)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--amp", action="store_true", help="bf16 autocast for families that train (~2x faster on CPUs with AVX512-BF16)")
    p.add_argument("--image-size", default=None, help="N or WxH (default: each model's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, default=50, help="timed runs per speed figure")
    p.add_argument("--reference", nargs="*", default=[], metavar="FILE", help="earlier result JSONs to quote")
    p.add_argument("--work", default="runs/families")
    p.add_argument("--name", default="families.json", help="result file name in --results")
    p.add_argument("--results", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from train.models import list_models

    for spec in args.models:
        if parse_spec(spec)[0] not in list_models():
            p.error(f"--models {spec}: unknown model; available: {', '.join(list_models())}")
    for d in args.data:
        if not (Path(d) / "train" / "good").is_dir() or not (Path(d) / "test").is_dir():
            p.error(f"--data {d}: not an MVTec-layout class folder (needs train/good and test/)")
    rows = []
    for data in args.data:
        for spec in args.models:
            rows.append(run_one(spec, data, Path(args.work), args, taken={r["work_dir"] for r in rows}))
            write_result(args.name, {"rows": rows, "references": [reference(f) for f in args.reference]},
                         args.results)  # after every row: a long run keeps what it measured
    print(json.dumps([{k: r[k] for k in ("model", "options", "data", "fit_wall_seconds")} |
                      {"image_auroc": r["metrics"]["image_score"]["image_auroc"],
                       "pixel_auroc": r["metrics"]["image_score"]["pixel_auroc"],
                       "aupro": r["metrics"]["image_score"]["aupro"], **r["cpu"]} for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
