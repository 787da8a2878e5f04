"""Wall time of onboarding a product at the line: ``python -m calibration fit`` on N good images, torch-free.

    python -m benchmarks.onboarding_time --model M.onnx --good DIR [--images 100] [--repeat 3] [--name F.json]

Each repeat copies the artifact (so every run starts from the same model), then runs the real CLI,
``python -m calibration fit --model COPY --good DIR --max-images N``, in a fresh interpreter whose import hook
refuses torch (``tests.torch_free``: what a line PC without torch sees), and times the whole process: start-up,
reading and resizing the images, the graph over them, the memory / prototype refit, the head fit and the atomic
rewrite. Any model: what gets refit is what the sidecar declares. Target of the cross-class issue: <= 60 s for
100 images at 256 px on 2 CPU cores. Writes benchmarks/results/<name> (machine, command, date, load average).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_result
from runtime.artifact import read_sidecar, sidecar_path
from tests.torch_free import BLOCK_TORCH

ROOT = Path(__file__).resolve().parents[1]


def onboard_once(model: Path, good: Path, images: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / model.name
        shutil.copy2(model, copy)
        shutil.copy2(sidecar_path(model), sidecar_path(copy))
        prog = BLOCK_TORCH + ("import sys; from calibration.cli import main; "
                              f"sys.exit(main(['fit', '--model', {str(copy)!r}, '--good', {str(good)!r}, "
                              f"'--max-images', '{images}']))")
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", prog], cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(f"calibration fit failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
        return {"wall_s": round(wall, 2), "load_average_1min_before": round(load, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.onboarding_time", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--good", required=True, type=Path, help="folder of good images")
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--name", default="onboarding_time.json")
    p.add_argument("--results", default=None)
    args = p.parse_args(argv)
    if not args.model.is_file():
        p.error(f"--model {args.model}: not found")
    n_available = sum(1 for f in args.good.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    if n_available < args.images:
        p.error(f"--good {args.good}: {n_available} images, fewer than --images {args.images}")
    sc = read_sidecar(args.model)
    runs = [onboard_once(args.model, args.good, args.images) for _ in range(args.repeat)]
    walls = [r["wall_s"] for r in runs]
    memory = (sc.family_params or {}).get("memory") or {}
    payload = {"model": str(args.model), "family": sc.family, "model_name": sc.model_name,
               "input": {"height": sc.input.height, "width": sc.input.width},
               "memory_method": memory.get("method", "coreset" if memory else None),
               "good": str(args.good), "images": args.images, "runs": runs,
               "median_wall_s": statistics.median(walls), "target_s": 60,
               "target_met": statistics.median(walls) <= 60, "torch_blocked": True}
    print(write_result(args.name, payload, args.results))
    print(f"median {payload['median_wall_s']:.1f} s for {args.images} images ({', '.join(f'{w:.1f}' for w in walls)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
