"""The layout share (calibration.layout) of each class's training images, at several input sizes: what the
memory bank's ``global_gaussian=auto`` switch decides on, and how far each class is from its threshold.

    python -m benchmarks.layout_share --data DIR ... --sizes 64 256 384 --name layout_share.json

Training images only (never a test split). Also reports the share before the backbone's own position signal
is taken away (``raw``), to show what the rolled images correct.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from benchmarks.common import write_result

log = logging.getLogger(__name__)


def raw_share(cells: np.ndarray) -> float:
    """The share without the backbone's correction (``calibration.layout.position_spread`` of the images alone)."""
    from calibration.layout import position_spread

    between, within = position_spread(cells)
    between = max(between, 0.0)
    return between / (between + within) if between + within > 0 else 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.layout_share", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, metavar="DIR", help="MVTec-layout class folders")
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 256, 384], help="square input sizes")
    p.add_argument("--model", default="patchcore_lite", help="the memory-bank model whose features are measured")
    p.add_argument("--small-model", default="patchcore_lite0", help="used below 128 px (the unit tests' size)")
    p.add_argument("--name", default="layout_share.json")
    p.add_argument("--results", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from calibration.layout import LAYOUT_MIN, layout_cells, layout_fraction, rolled_frames
    from runtime.dataset import open_dataset
    from train.data import load_frames
    from train.models import create_model

    rows = []
    for size in args.sizes:
        name = args.small_model if size < 128 else args.model
        model = create_model(name, image_size=size).eval()
        for data in args.data:
            t0 = time.perf_counter()
            paths = list(open_dataset(data).train)
            frames = load_frames(paths, size, desc=Path(data).name)
            cells = layout_cells(model.extract(frames, "cpu"))
            rolled = layout_cells(model.extract(rolled_frames(frames), "cpu"))
            share = layout_fraction(cells, rolled)
            rows.append({"data": str(data), "size": size, "model": name, "n_images": len(frames),
                         "layout": round(share, 4), "raw": round(raw_share(cells), 4),
                         "gaussian_on": bool(share >= LAYOUT_MIN), "seconds": round(time.perf_counter() - t0, 1)})
            log.info("%s at %d px: layout %.3f (raw %.3f) -> Gaussian %s", Path(data).name, size, share,
                     rows[-1]["raw"], "on" if rows[-1]["gaussian_on"] else "off")
            write_result(args.name, {"threshold": LAYOUT_MIN, "rows": rows}, args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
