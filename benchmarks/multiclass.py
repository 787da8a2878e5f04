"""One unified UniAD for several product classes vs EfficientAD-lite trained separately per class.

    python -m benchmarks.multiclass --data ../shared/data/mvtec_ad/bottle /tmp/mc/board /tmp/mc/fabric \
        --image-size 192 --steps-per-class 200 --batch-size 4 --name multiclass_3cls.json

Same classes, same per-class budget: each EfficientAD model trains ``--steps-per-class`` steps on
its class; the unified UniAD trains ``--steps-per-class`` x (number of classes) steps on the mixed
classes (the same number of images per class, at the same batch size). Per class and mean: image
AUROC, pixel AUROC, AUPRO (FPR <= 0.3), F1-max, and the deployed OK/NG figures (false alarms on good test
images, misses per defect type) at the threshold each class is deployed with (UniAD: the class's own,
fitted on its held-out images); model file size (one artifact vs one per class);
CPU ms per frame through ONNX Runtime at batch 1. ``--ablation`` adds UniAD runs with each
anti-shortcut mechanism flipped from its default (neighbour mask off, learned queries on, feature jitter off).
Result JSON in benchmarks/results/ with machine, command and date.

The two sides can run as separate processes (``--skip-efficientad`` / ``--skip-uniad``, e.g. at
different times on a 2-core machine) and be joined afterwards; the join refuses files whose classes,
input size or per-class budget differ::

    python -m benchmarks.multiclass --merge results/uni.json results/eff.json --name multiclass_joined.json

``--resume`` continues an interrupted run of the same experiment from its result file (--name): the
classes the per-class EfficientAD side already finished, and a finished UniAD, are kept, not retrained.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, write_result

log = logging.getLogger("benchmarks.multiclass")
METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")
# each of UniAD's three anti-shortcut mechanisms flipped from its default, one at a time (learned decoder queries are
# off by default since painted validation preferred that, so their run switches them on)
ABLATIONS = {"no_neighbor_mask": {"neighbor_mask": False}, "with_learned_query": {"learned_query": True},
             "no_feature_jitter": {"feature_jitter": False}}


def _train(data, out: Path, model: str, steps: int, args, model_kwargs: dict,
           map_blur: float | str | None = None) -> tuple[Path, float]:
    from train.loop import TrainConfig, train

    cfg = TrainConfig(data=data, out=str(out), model=model, image_size=args.image_size, steps=steps,
                      batch_size=args.batch_size, seed=args.seed, save_every=0, model_kwargs=model_kwargs,
                      map_blur=map_blur)
    t0 = time.time()
    ckpt = train(cfg)
    return ckpt, time.time() - t0


def class_threshold(blob: dict, name: str) -> float:
    """The threshold a class is deployed with: its own (``thresholds.per_class``, multi-class training) or the
    model's global one."""
    thr = blob.get("thresholds") or {}
    return float((thr.get("per_class") or {}).get(name, thr["image"]))


def _evaluate(model, blob: dict, label: str, classes: list[str]) -> tuple[dict, dict | None]:
    """Per class: the threshold-free metrics, and the OK/NG figures at the threshold the class is deployed with;
    and the map smoothing training recorded in the checkpoint (what ``--map-blur auto`` chose)."""
    from train.evaluate import evaluate_model

    res = {}
    for d in classes:
        name = Path(d).name
        r = evaluate_model(model, d, "cpu", threshold=class_threshold(blob, name))
        res[name] = {k: r["image_score"][k] for k in METRICS}
        log.info("%s %s: %s", label, name, {k: round(v, 4) for k, v in res[name].items()})
        res[name]["deployed"] = r["deployed"]
    return res, blob.get("map_smoothing")


def held_out_frames(classes: list[str], image_size: str, seed: int) -> dict[str, np.ndarray]:
    """Each class's held-out validation images (uint8 NHWC), by class name: the split training drew (same data,
    size, seed). Reads the images only; nothing is written."""
    from train.loop import TrainConfig, load_training_images

    imgs = load_training_images(TrainConfig(data=classes, out="", model="uniad", image_size=image_size, seed=seed))
    cls = np.asarray(imgs.val_classes)
    return {Path(d).name: imgs.val[cls == Path(d).name] for d in classes}


def painted_per_class(model, classes: list[str], image_size: str, seed: int,
                      held_out: dict[str, np.ndarray] | None = None) -> dict:
    """Per class: the metrics on that class's held-out validation images plus defects painted on them
    (``train.painted_validation``), and their mean: what a UniAD setting (input size, an option) may be
    chosen on, never the test split. ``held_out``: ``held_out_frames`` of the same arguments, when already read."""
    from train.painted_validation import painted_validation

    if held_out is None:
        held_out = held_out_frames(classes, image_size, seed)
    per = {name: painted_validation(model, frames, seed=seed) for name, frames in held_out.items()}
    key = "image_score"
    per["mean_image_plus_pixel_auroc"] = float(np.mean([v[key]["image_auroc"] + v[key]["pixel_auroc"]
                                                        for v in per.values()]))
    return per


def without_offset(model, blob: dict, label: str, classes: list[str], args, held_out: dict[str, np.ndarray]) -> dict:
    """The same trained model with its map upsampled without the grid offset (``train.geometry``): what the
    offset is worth, on painted validation (where it is chosen) and the test splits (reported). Image scores
    are the map's maximum on the grid, so only the pixel metrics can move."""
    from train.geometry import drawn_at

    with drawn_at(model, (0.0, 0.0)):
        per, _ = _evaluate(model, blob, f"{label} without offset", classes)
        painted = painted_per_class(model, classes, args.image_size, args.seed, held_out)
    return {"painted_validation": painted, "per_class": per, "mean": _mean(per)}


def _mean(per_class: dict) -> dict:
    return {k: float(np.mean([v[k] for v in per_class.values()])) for k in METRICS}


def _speed(ckpt: Path, repeats: int) -> dict:
    """Export (fp32, batch 1), check parity with torch, time ORT at batch 1 on the prepared frame."""
    from export.onnx_export import export_onnx
    from runtime.model import Model
    from train.loop import load_checkpoint, run_outputs

    path = export_onnx(ckpt, ckpt.parent / "model.onnx")
    m = Model(path, backend="onnxruntime", device="cpu")
    frames = np.random.default_rng(0).integers(0, 256, (4, m.height, m.width, 3), dtype=np.uint8)
    torch_model, _ = load_checkpoint(ckpt)
    ref = run_outputs(torch_model, frames, "cpu", batch=1, keys=("image_score", "anomaly_map"))
    got = {k: np.concatenate([m.infer(frames[i:i + 1])[k] for i in range(4)]) for k in ("image_score", "anomaly_map")}
    parity = max(float(np.max(np.abs(got[k] - ref[k]))) for k in got)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        m.infer(frames[:1])
        times.append((time.perf_counter() - t0) * 1000)
    size = sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))
    return {"onnx_bytes": int(size), "ms_per_frame_median": float(np.median(times)), "ms_per_frame_min": float(min(times)),
            "ort_threads": os.environ.get("EDGEAD_THREADS", "default"), "parity_max_abs": parity,
            "provider": m.provider}


SAME_SETTINGS = ("classes", "image_size", "steps_per_class", "batch_size", "seed")


def merge_results(uniad: dict, efficientad: dict) -> dict:
    """Join a UniAD-only and an EfficientAD-only result of this benchmark into one comparison.

    Raises ValueError when the two runs are not the same experiment (classes, input size, budget, seed).
    The mean difference is over the classes both sides finished (listed in ``compared_classes``)."""
    if "uniad" not in uniad or "efficientad_per_class" not in efficientad:
        raise ValueError("--merge takes a UniAD result first and an EfficientAD result second")
    diff = [k for k in SAME_SETTINGS if uniad.get(k) != efficientad.get(k)]
    if diff:
        raise ValueError(f"the two results differ in {', '.join(diff)}: they are not the same experiment")
    u, e = uniad["uniad"]["per_class"], efficientad["efficientad_per_class"]["per_class"]
    common = [c for c in uniad["classes"] if c in u and c in e]
    if not common:
        raise ValueError("no class was finished by both runs")
    out = {k: uniad[k] for k in SAME_SETTINGS}
    out.update({"data": uniad.get("data"), "uniad_kwargs": uniad.get("uniad_kwargs"),
                "uniad_map_blur": uniad.get("uniad_map_blur"), "uniad": uniad["uniad"],
                "efficientad_per_class": efficientad["efficientad_per_class"],
                "sources": {"uniad": {k: uniad.get(k) for k in ("command", "date", "machine", "threads")},
                            "efficientad": {k: efficientad.get(k) for k in ("command", "date", "machine", "threads")}},
                "compared_classes": common})
    mu, me = _mean({c: u[c] for c in common}), _mean({c: e[c] for c in common})
    out["uniad_minus_efficientad_per_class"] = {c: {k: u[c][k] - e[c][k] for k in METRICS} for c in common}
    out["uniad_minus_efficientad_mean"] = {k: mu[k] - me[k] for k in METRICS}
    return out


def resumable_state(previous: dict, settings: dict) -> dict:
    """What an interrupted run with the same settings already finished: ``{"uniad": ..., "efficientad_per_class": ...}``.

    Raises ValueError when ``previous`` is another experiment (classes, input size, budget, seed, UniAD options)."""
    keys = SAME_SETTINGS + ("uniad_kwargs", "uniad_map_blur")
    diff = [k for k in keys if previous.get(k) != settings.get(k)]
    if diff:
        raise ValueError(f"cannot resume: the earlier result differs in {', '.join(diff)}; use another --name")
    return {k: previous[k] for k in ("uniad", "efficientad_per_class") if k in previous}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", metavar="DIR", help="class folders (MVTec layout)")
    p.add_argument("--merge", nargs=2, metavar=("UNIAD_JSON", "EFFICIENTAD_JSON"),
                   help="join two earlier runs of this benchmark (UniAD-only, EfficientAD-only) into --name")
    p.add_argument("--image-size", default="192")
    p.add_argument("--steps-per-class", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--uniad-map-blur", default=None, metavar="SIGMA|auto",
                   help="UniAD's map smoothing (train --map-blur): a sigma in px at 256 px, or 'auto' (chosen on "
                        "painted validation defects, never on the test split); default: the model's own")
    p.add_argument("--uniad-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="UniAD option (repeatable), e.g. hidden=128")
    p.add_argument("--skip-efficientad", action="store_true", help="UniAD (and ablations) only")
    p.add_argument("--skip-uniad", action="store_true", help="ablations only (with --ablation)")
    p.add_argument("--ablation", nargs="*", choices=sorted(ABLATIONS), default=None, metavar="RUN",
                   help="also UniAD with each anti-shortcut mechanism flipped from its default, one run each "
                        f"(all, or the named ones: {', '.join(ABLATIONS)})")
    p.add_argument("--speed-repeats", type=int, default=30)
    p.add_argument("--work", default="runs/multiclass")
    p.add_argument("--name", default="multiclass.json")
    p.add_argument("--resume", action="store_true",
                   help="keep what an interrupted run of the same experiment (the --name file) already finished")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.merge:
        import json

        try:
            merged = merge_results(*(json.loads(Path(f).read_text()) for f in args.merge))
        except (OSError, ValueError) as e:
            p.error(str(e))
        print(write_result(args.name, merged))
        return
    if not args.data:
        p.error("--data is required (or --merge)")
    from train.cli import parse_model_args
    from train.loop import load_checkpoint

    uni_kw = parse_model_args(args.uniad_arg)
    if args.uniad_map_blur is not None:
        from train.loop import parse_map_blur

        try:
            args.uniad_map_blur = parse_map_blur(args.uniad_map_blur)
        except ValueError as e:
            p.error(str(e))
    work = Path(args.work)
    classes = list(args.data)
    n = len(classes)
    result: dict = {"classes": [Path(d).name for d in classes], "data": classes, "image_size": args.image_size,
                    "steps_per_class": args.steps_per_class, "batch_size": args.batch_size, "seed": args.seed,
                    "uniad_kwargs": uni_kw, "uniad_map_blur": args.uniad_map_blur, "threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "EDGEAD_THREADS")}}
    name = args.name
    done: dict = {}
    if args.resume and (RESULTS / name).exists():
        import json

        previous = json.loads((RESULTS / name).read_text())
        try:
            done = resumable_state(previous, result)
        except ValueError as e:
            p.error(str(e))
        result.update(done)
        result["resumed_from"] = {k: previous.get(k) for k in ("command", "date")}
        log.info("resuming %s: keeping %s", name, sorted(done))

    def save() -> None:
        write_result(name, result)

    wanted = [] if args.ablation is None else (args.ablation or list(ABLATIONS))  # --ablation alone: all
    ablations = [(k, v) for k, v in ABLATIONS.items() if k in wanted]
    runs = ([] if args.skip_uniad else [("uniad", {})]) + ablations
    held_out = None
    for label, off in runs:
        if label in done:
            continue
        ckpt, secs = _train(classes, work / label, "uniad", args.steps_per_class * n, args, {**uni_kw, **off},
                            args.uniad_map_blur)
        model, blob = load_checkpoint(ckpt)  # once, for the test splits and the painted validation
        per, smoothing = _evaluate(model, blob, label, classes)
        if held_out is None:  # read once: every run below trains on the same split
            held_out = held_out_frames(classes, args.image_size, args.seed)
        painted = painted_per_class(model, classes, args.image_size, args.seed, held_out)
        result[label] = {"changed_from_default": dict(sorted(off.items())), "steps": args.steps_per_class * n,
                         "train_seconds": secs, "map_smoothing": smoothing, "painted_validation": painted,
                         "per_class": per, "mean": _mean(per), "speed": _speed(ckpt, args.speed_repeats) if label == "uniad" else None,
                         "map_offset_px": list(model.head.map_offset_px)}
        if any(model.head.drawn_offset_px):
            result[label]["without_map_offset"] = without_offset(model, blob, label, classes, args, held_out)
        save()
    if not args.skip_efficientad:
        kept = done.get("efficientad_per_class", {})
        per, secs, speed = dict(kept.get("per_class", {})), float(kept.get("train_seconds", 0.0)), kept.get("speed")
        for d in classes:
            if Path(d).name in per:
                continue
            ckpt, s = _train(d, work / f"efficientad_{Path(d).name}", "efficientad_lite", args.steps_per_class, args, {})
            secs += s
            model, blob = load_checkpoint(ckpt)
            per.update(_evaluate(model, blob, "efficientad", [d])[0])
            if speed is None:
                speed = _speed(ckpt, args.speed_repeats)
                speed["onnx_bytes_all_classes"] = speed["onnx_bytes"] * n
            result["efficientad_per_class"] = {"steps_each": args.steps_per_class, "train_seconds": secs,
                                               "per_class": dict(per), "speed": speed}
            save()
        result["efficientad_per_class"]["mean"] = _mean(per)
    if "uniad" in result and "efficientad_per_class" in result:
        result["uniad_minus_efficientad_mean"] = {k: result["uniad"]["mean"][k] - result["efficientad_per_class"]["mean"][k]
                                                  for k in METRICS}
    print(save_path := write_result(name, result))
    log.info("wrote %s", save_path)


if __name__ == "__main__":
    main()
