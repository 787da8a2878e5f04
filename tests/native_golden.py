"""Golden preprocessing vectors for the C++ runtime: frame bytes -> prepared bytes by ``runtime.preprocess.fit_frame``.

    python -m tests.native_golden native/tests/golden     # refresh the committed set

The C++ test ``Preprocess.GoldenVectorsFromPython`` (native/tests/test_native.cpp) reads DIR/cases.json and
checks its own ``edgead::fit_frame`` byte for byte; ``tests/test_native.py`` regenerates the set on every run,
so a change on either side fails the build.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from runtime.artifact import atomic_write_bytes, atomic_write_text
from runtime.preprocess import FIT_POLICIES, INTERPOLATIONS, fit_frame

# (name, shape): odd sizes, gray, BGRA, wide and tall, smaller than the output (upscale) and
# >= 2x the output (whole-factor INTER_AREA pre-shrink, then the remaining fraction)
FRAMES = (("gray_37x53", (37, 53)), ("bgra_101x77", (101, 77, 4)), ("bgr_250x330", (250, 330, 3)),
          ("bgr_33x121", (33, 121, 3)), ("gray1_90x61", (90, 61, 1)))
TARGETS = ((24, 40), (33, 33), (64, 48))


def make_frame(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """uint8 noise on a gradient: every pixel matters, so any rounding difference shows."""
    rng = np.random.default_rng(seed)
    h, w = shape[:2]
    ramp = (np.add.outer(np.arange(h) * 3, np.arange(w) * 2) % 256).astype(np.int32)
    noise = rng.integers(0, 96, size=shape, dtype=np.int32)
    base = ramp.reshape(h, w, *([1] * (len(shape) - 2)))
    return ((base + noise) % 256).astype(np.uint8)


def write_golden(out: Path) -> int:
    """Write frames, prepared outputs and cases.json into ``out``; returns the number of cases."""
    out.mkdir(parents=True, exist_ok=True)
    cases = []
    for i, (name, shape) in enumerate(FRAMES):
        frame = make_frame(shape, i)
        atomic_write_bytes(out / f"{name}.frame.bin", frame.tobytes())
        for height, width in TARGETS:
            for fit in FIT_POLICIES:
                for resize in INTERPOLATIONS:
                    prepared = fit_frame(frame, height, width, resize, fit)
                    fname = f"{name}_{height}x{width}_{fit}_{resize}.prepared.bin"
                    atomic_write_bytes(out / fname, prepared.tobytes())
                    cases.append({"frame": f"{name}.frame.bin", "frame_shape": list(shape), "height": height,
                                  "width": width, "fit": fit, "resize": resize, "prepared": fname})
    atomic_write_text(out / "cases.json", json.dumps(cases, indent=1) + "\n")
    return len(cases)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m tests.native_golden OUT_DIR", file=sys.stderr)
        sys.exit(2)
    print(f"{write_golden(Path(sys.argv[1]))} cases written to {sys.argv[1]}")
