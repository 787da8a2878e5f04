"""PUAD vs EfficientAD on logical ("unpicturable") and structural defects of synthetic parts.

    python -m benchmarks.logical --device cuda --steps 8750 --batch-size 8

Generates a seeded synthetic dataset (runtime.synthetic) with both defect families,
trains once, and reports per-family image AUROC (each family's defects against the good
test parts) for EfficientAD alone (the map score), for PUAD (the deployed image score) and
for the Gaussian score alone. The result keeps the method names (efficientad, puad,
gaussian_only); ``SCORES`` says which deployed score each one is.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from benchmarks.common import write_result

# method name in the result -> the score ``train.evaluate.evaluate_model`` reports it under
SCORES = {"efficientad": "map_score", "puad": "image_score", "gaussian_only": "gaussian_score"}


def family_aurocs(metrics: dict, manifest: dict, names: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Mean per-defect image AUROC of each family ("structural", "logical") for each method name (``SCORES``).

    ``metrics``: ``train.evaluate.evaluate_model`` output; ``manifest``: the synthetic dataset's
    manifest.json, which lists the defect types of each family.
    """
    return {name: {fam: float(np.mean([metrics[SCORES[name]]["per_defect_auroc"][d] for d in manifest[fam]]))
                   for fam in ("structural", "logical")} for name in names}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8750)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--work", default="runs/logical")
    p.add_argument("--results", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--product", default="tray", choices=["tray", "board"],
                   help="tray: random layouts, count defects (default); board: fixed layout")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import json as _json

    from runtime.synthetic import write_dataset
    from train.evaluate import evaluate_model
    from train.loop import TrainConfig, load_checkpoint, train

    work = Path(args.work)
    data = write_dataset(work / args.product, size=args.image_size, n_train=200, n_test_good=60, n_per_defect=25,
                         seed=args.seed, product=args.product)
    manifest = _json.loads((data / "manifest.json").read_text())
    ckpt = train(TrainConfig(data=str(data), out=str(work / f"run_{args.product}"), steps=args.steps, batch_size=args.batch_size,
                             device=args.device, image_size=args.image_size, seed=args.seed))
    model, blob = load_checkpoint(ckpt)
    m = evaluate_model(model, str(data), args.device)
    fam = family_aurocs(m, manifest, ("efficientad", "puad", "gaussian_only"))
    payload = {"product": args.product, "steps": args.steps, "batch_size": args.batch_size, "train_seconds": blob["train"]["train_seconds"],
               "families": fam, "metrics": m,
               "puad_minus_efficientad": {k: fam["puad"][k] - fam["efficientad"][k] for k in ("structural", "logical")}}
    path = write_result(f"logical_synthetic_{args.product}.json", payload, args.results)
    print(json.dumps(fam, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
