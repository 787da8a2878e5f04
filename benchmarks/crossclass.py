"""Cross-class onboarding: a model trained on some classes, onboarded to unseen ones from good images only,
against the memory bank onboarded from the SAME good images at the same input size.

    nice -n 10 python -m benchmarks.crossclass --data-root /tmp/ccb/data --protocol objects_to_textures \\
        --episodes 300 --name crossclass_objects_to_textures.json
    nice -n 10 python -m benchmarks.crossclass --data-root /tmp/ccb/data --protocol textures_to_objects \\
        --extra-unseen ../shared/data/mvtec_ad/bottle --curve-classes bottle --name crossclass_textures_to_objects.json

``--data-root``: a folder written by ``python -m runtime.synthetic_classes --real-textures --train 100`` (the
classes of each protocol are taken from it). Protocols (as in One-for-All / PMAD): train on objects (board,
tray, screw, connector) and onboard each texture (fabric, wood, leather, + real brick, grass, gravel where
present); train on textures and onboard each object (+ ``--extra-unseen`` folders, e.g. real MVTec bottle,
never seen in training). Per unseen class, for both families: ``python -m calibration fit`` (torch-free
code path, ``calibration.field.calibrate``) on the first ``--onboard`` train/good images -> image AUROC,
pixel AUROC, AUPRO (FPR <= 0.3) of the deployed ONNX on the class's test split, and the onboarding wall
time. ``--curve-classes``: also onboard from 10/20/50/100 images. The memory bank (``patchcore_lite``)
is fit once on the first training class and then onboarded exactly like the cross-class model.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.common import write_result

log = logging.getLogger("benchmarks.crossclass")
OBJECTS = ("board", "tray", "screw", "connector")
TEXTURES = ("fabric", "wood", "leather", "brick", "grass", "gravel")
PROTOCOLS = {"objects_to_textures": (OBJECTS, TEXTURES), "textures_to_objects": (TEXTURES, OBJECTS)}
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def evaluate_onnx(onnx_path: Path, data: Path, batch: int = 8) -> dict:
    """Image / pixel AUROC and AUPRO of a deployed ONNX on ``data``'s test split (through the runtime)."""
    from calibration.metrics import evaluate
    from runtime.dataset import open_dataset, read_mask
    from runtime.model import Model
    from train.data import load_frames

    ds = open_dataset(data)
    m = Model(onnx_path, backend="onnxruntime", device="cpu", warmup=0)
    h, w = m.sidecar.input.height, m.sidecar.input.width
    frames = load_frames([s.path for s in ds.test], (h, w), "test images")
    labels = np.array([s.label for s in ds.test])
    masks = np.stack([read_mask(s, h, w) for s in ds.test])
    scores, maps = [], []
    for i in range(0, len(frames), batch):
        out = m.infer(m.prepare(list(frames[i:i + batch])))
        scores.append(np.asarray(out["image_score"], np.float64))
        maps.append(np.asarray(out["anomaly_map"], np.float32)[:, 0])
    m.close()
    s = evaluate(labels, np.concatenate(scores), masks, np.concatenate(maps))
    return {"image_auroc": s.image_auroc, "pixel_auroc": s.pixel_auroc, "aupro": s.aupro, "n_test": int(len(labels))}


def onboard(onnx_path: Path, data: Path, n: int, work: Path) -> dict:
    """Copy the artifact, onboard it on the first ``n`` good images of ``data``; metrics and wall time."""
    from calibration.field import calibrate
    from runtime.artifact import sidecar_path
    from runtime.dataset import list_images

    dst_dir = work / f"{data.name}_{onnx_path.parent.name}_{n}"
    shutil.rmtree(dst_dir, ignore_errors=True)
    good = dst_dir / "good"
    good.mkdir(parents=True)
    imgs = list_images(data / "train" / "good")[:n]
    for p in imgs:
        os.symlink(p.resolve(), good / p.name)
    dst = dst_dir / "model.onnx"
    shutil.copy2(onnx_path, dst)
    shutil.copy2(sidecar_path(onnx_path), sidecar_path(dst))
    t0 = time.perf_counter()
    res = calibrate(dst, str(good), any_aspect=True)
    seconds = time.perf_counter() - t0
    row = {"n_good": len(imgs), "onboard_seconds": round(seconds, 2), **evaluate_onnx(dst, data)}
    log.info("%s %s n=%d: image %.4f pixel %.4f aupro %.4f, onboarding %.1fs", onnx_path.parent.name, data.name,
             len(imgs), row["image_auroc"], row["pixel_auroc"], row["aupro"], seconds)
    shutil.rmtree(dst_dir, ignore_errors=True)
    del res
    return row


def subset(data: Path, n: int, work: Path) -> str:
    """A class folder holding only the first ``n`` train/good images of ``data`` (symlinks)."""
    from runtime.dataset import list_images

    dst = work / data.name / "train" / "good"
    shutil.rmtree(dst.parent.parent, ignore_errors=True)
    dst.mkdir(parents=True)
    for p in list_images(data / "train" / "good")[:n]:
        os.symlink(p.resolve(), dst / p.name)
    return str(dst.parent.parent)


def train_and_export(model: str, data: list[str], out: Path, args, kwargs: dict, steps: int) -> tuple[Path, float | None]:
    """Train + export (fp32, dynamic batch); ``--reuse``: an earlier run's export in ``out`` (time None)."""
    from export.onnx_export import export_onnx
    from train.loop import TrainConfig, train

    if args.reuse and (out / "model.onnx").is_file() and (out / "model.onnx.json").is_file():
        log.info("reusing %s", out / "model.onnx")
        return out / "model.onnx", None

    cfg = TrainConfig(data=data if len(data) > 1 else data[0], out=str(out), model=model,
                      image_size=f"{args.image_size}x{args.image_size}", steps=steps, seed=args.seed, save_every=0,
                      device="cpu", model_kwargs=kwargs)
    t0 = time.perf_counter()
    ckpt = train(cfg)
    secs = time.perf_counter() - t0
    return export_onnx(ckpt, out / "model.onnx", batch="dynamic"), secs


def _mean(rows: dict, family: str) -> dict:
    return {k: float(np.mean([r[family][k] for r in rows.values()])) for k in METRICS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.crossclass", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True, help="folder of synthetic classes (runtime.synthetic_classes)")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), required=True)
    p.add_argument("--extra-unseen", nargs="*", default=[], help="more unseen class folders (e.g. MVTec bottle)")
    p.add_argument("--unseen", nargs="*", default=None, metavar="CLASS",
                   help="only these of the protocol's unseen classes (CPU budget; default: all present)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--episodes", type=int, default=300)
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="crossclass option (repeatable)")
    p.add_argument("--train-images", type=int, default=40, help="good images per training class (CPU budget)")
    p.add_argument("--onboard", type=int, default=100, help="good images per onboarding (default 100)")
    p.add_argument("--curve-classes", nargs="*", default=[], help="unseen classes also onboarded from --curve sizes")
    p.add_argument("--curve", type=int, nargs="+", default=[10, 20, 50, 100], help="onboarding curve sizes")
    p.add_argument("--work", default="/tmp/crossclass_bench")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-bank", choices=("run", "skip"), default="run",
                   help="skip: onboard only the cross-class model (quick studies; the result then has no comparison)")
    p.add_argument("--reuse", action="store_true", help="reuse models trained and exported by an earlier run in --work")
    p.add_argument("--name", default=None, help="result file name in benchmarks/results/")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from train.cli import parse_model_args

    root = Path(args.data_root)
    seen_names, unseen_names = PROTOCOLS[args.protocol]
    work = Path(args.work) / args.protocol
    seen = [subset(root / c, args.train_images, work / "seen") for c in seen_names if (root / c).is_dir()]
    unseen = [Path(d) for d in args.extra_unseen]  # first: real classes matter most when a run is cut short
    unseen += [root / c for c in unseen_names if (root / c).is_dir() and (args.unseen is None or c in args.unseen)]
    if not seen or not unseen:
        p.error(f"{root}: no training or no unseen classes of {args.protocol}; write them with "
                "`python -m runtime.synthetic_classes --out DIR --real-textures --train 100`")
    overlap = {Path(s).name for s in seen} & {u.name for u in unseen}
    if overlap:
        p.error(f"classes {sorted(overlap)} are both seen and unseen")
    work.mkdir(parents=True, exist_ok=True)
    cc_onnx, cc_train_s = train_and_export("crossclass_lite", seen, work / "crossclass", args,
                                           parse_model_args(args.model_arg), args.episodes)
    pc_onnx, pc_train_s = (train_and_export("patchcore_lite", seen[:1], work / "memorybank", args, {}, 1)
                           if args.memory_bank == "run" else (None, None))
    families = (("crossclass", cc_onnx),) + ((("memory_bank", pc_onnx),) if pc_onnx else ())
    per_class, curves = {}, {}

    def payload(complete: bool) -> dict:
        return {
            "protocol": args.protocol, "seen": [Path(s).name for s in seen], "unseen": [u.name for u in unseen],
            "complete": complete, "image_size": args.image_size, "episodes": args.episodes,
            "train_images_per_class": args.train_images, "onboard_images": args.onboard,
            "crossclass_options": parse_model_args(args.model_arg),
            "train_seconds": {"crossclass": cc_train_s and round(cc_train_s, 1),
                              "memory_bank": pc_train_s and round(pc_train_s, 1)},
            "per_class": per_class, "mean": {f: _mean(per_class, f) for f, _ in families} if per_class else None,
            "onboarding_curve": curves, "cpu_threads": os.cpu_count(), "load_average_after": os.getloadavg(),
            "notes": "onboarding = python -m calibration fit (calibration.field.calibrate) on the first N train/good "
                     "images, any aspect accepted; metrics of the rewritten ONNX through ONNX Runtime on CPU; "
                     "the CPU was shared with other jobs (see load_average_after): wall times are upper bounds",
        }

    name = args.name or f"crossclass_{args.protocol}.json"
    for data in unseen:  # results written after every class: a long run that is stopped keeps what it measured
        per_class[data.name] = {f: onboard(o, data, args.onboard, work) for f, o in families}
        write_result(name, payload(False))
        if data.name in args.curve_classes:
            curves[data.name] = {}
            for fam, o in families:
                curves[data.name][fam] = [per_class[data.name][fam] if n == args.onboard else onboard(o, data, n, work)
                                          for n in args.curve]
                write_result(name, payload(False))
    path = write_result(name, payload(True))
    final = payload(True)
    for name, r in per_class.items():
        log.info("%-10s %s", name, " | ".join(f"{f} {({k: round(r[f][k], 3) for k in METRICS})}" for f in r))
    log.info("mean: %s", final["mean"])
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
