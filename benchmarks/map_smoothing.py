"""How much the post-network settings (map smoothing, PUAD mix) change accuracy, on one checkpoint.

    python -m benchmarks.map_smoothing --checkpoint runs/accuracy/bottle_lite/checkpoint.pt \\
        --data ../shared/data/mvtec_ad/bottle --sigmas 0 4 8 12

For every sigma (Gaussian, in pixels at the 256 px reference scale; 0 = off) the model
is recalibrated on the checkpoint's own validation split (the score normalization
depends on the smoothed map) and evaluated on DATA/test with the standard metrics.
No retraining: smoothing is a fixed filter after the networks. On synthetic datasets
with a manifest, the structural/logical family AUROCs are reported as well.
``--puad-weights`` and ``--puad-gates`` also sweep the weight of the Gaussian score in
the PUAD mix and the z above which it counts (recalibrated the same way): the trade-off
between logical and structural defects.

Choosing a setting on the test split it is reported on flatters it. ``--eval-data`` scores
another folder's test split instead (recalibration still uses the checkpoint's own
training data), e.g. a synthetic dataset written with another seed: choose there,
then report the choice on DATA/test.

``--select`` does the choosing without any defect image: the sigma is picked on defects
painted on the checkpoint's own validation images (``train.select_smoothing``, the same
code as ``python -m train --map-blur auto``) and only the chosen sigma is scored on
DATA/test; the file holds the selection rows and that one test row.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from benchmarks.common import write_result
from calibration.fitting import DEFAULT_PUAD_GATE, parse_gate


def load_for_recalibration(checkpoint: str, data: str, eval_data: str | None = None):
    """Model, checkpoint blob, the run's own fit/validation frames, and the defect families of the
    evaluated folder (or None)."""
    from runtime.dataset import open_dataset
    from train.data import load_frames, split_train_validation
    from train.loop import load_checkpoint

    model, blob = load_checkpoint(checkpoint)
    ds = open_dataset(data, require_test=False)
    fit_paths, val_paths = split_train_validation(ds, int(blob["train"]["seed"]))
    size = model.cfg.image_size
    fit, val = load_frames(fit_paths, size, "train images"), load_frames(val_paths, size, "validation images")
    manifest = Path(eval_data or data) / "manifest.json"
    families = json.loads(manifest.read_text()) if manifest.is_file() else None
    return model, blob, fit, val, families


def evaluate_recalibrated(model, data: str, device: str, fit, val, sigma: float, puad_weight: float,
                          target_fpr: float, families: dict | None,
                          puad_gate: float | None = DEFAULT_PUAD_GATE) -> dict:
    """Set the smoothing, recalibrate every constant on the run's own split, evaluate on data/test."""
    from benchmarks.logical import SCORES, family_aurocs
    from train.evaluate import evaluate_model
    from train.loop import calibrate_model

    model.to(device).set_map_smoothing(sigma)
    calibrate_model(model, fit, val, device, puad_weight, target_fpr, puad_gate)
    m = evaluate_model(model, data, device)
    row = {"sigma_px_at_256": sigma, "puad_weight": puad_weight, "puad_gate": puad_gate,
           **{f"efficientad_{k}": m[SCORES["efficientad"]][k] for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max")},
           "puad_image_auroc": m[SCORES["puad"]]["image_auroc"]}
    if families:
        for name, fams in family_aurocs(m, families, ("efficientad", "puad")).items():
            row.update({f"{name}_{fam}_auroc": v for fam, v in fams.items()})
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="MVTec-layout folder the checkpoint was trained on")
    p.add_argument("--sigmas", type=float, nargs="+", default=None,
                   help="sigmas to score on the test split (default 0 4 8 12); with --select: the candidates "
                        "(default those of train.select_smoothing)")
    p.add_argument("--select", action="store_true",
                   help="choose the sigma on defects painted on the validation images, score only that one on DATA/test")
    p.add_argument("--puad-weights", type=float, nargs="+", default=None,
                   help="weights of the Gaussian score to try (default: the checkpoint's)")
    p.add_argument("--puad-gates", type=parse_gate, nargs="+", default=None, metavar="Z|none",
                   help="z above which the Gaussian score counts; none = plain sum (default: the checkpoint's)")
    p.add_argument("--eval-data", default=None,
                   help="evaluate on this folder's test split instead of DATA/test (a held-out set to choose on)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--name", default=None, help="result file name (default map_smoothing_<data>.json)")
    p.add_argument("--results", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model, blob, fit, val, families = load_for_recalibration(args.checkpoint, args.data, args.eval_data)
    tcfg = blob["train"]
    gates = args.puad_gates or [tcfg.get("puad_gate")]  # checkpoints from before the gate: plain sum
    selection = None
    if args.select:
        from train.select_smoothing import SMOOTHING_CANDIDATES, choose_map_smoothing

        choice = choose_map_smoothing(model.to(args.device), val, args.device,
                                      tuple(args.sigmas or SMOOTHING_CANDIDATES), seed=int(tcfg["seed"]))
        selection = choice.to_dict()
        sigmas = [choice.sigma]
    else:
        sigmas = args.sigmas or [0, 4, 8, 12]
    rows = []
    for sigma in sigmas:
        for w in args.puad_weights or [float(tcfg["puad_weight"])]:
            for gate in gates:
                row = evaluate_recalibrated(model, args.eval_data or args.data, args.device, fit, val, sigma, w,
                                            float(tcfg["target_fpr"]), families, gate)
                logging.info("%s", row)
                rows.append(row)
    name = args.name or f"map_smoothing_{Path(args.data).name}.json"
    path = write_result(name, {"checkpoint": str(args.checkpoint), "evaluated_on": args.eval_data or args.data,
                               "checkpoint_config": blob["config"],
                               "train_steps": tcfg["steps"], "batch_size": tcfg["batch_size"],
                               **({"selection": selection} if selection else {}), "rows": rows},
                        args.results)
    print(json.dumps(rows, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
