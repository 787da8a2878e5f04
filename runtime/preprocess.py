"""Host-side frame preparation, shared by the runtime, calibration and training.

The graph does everything else (cast, colour order, scaling, mean/std, layout);
the host only fits a frame of any size to the graph's input size, in the
colour order OpenCV delivers (BGR). Training uses the same function, so
training-time and deployment-time pixels cannot drift apart.
"""
from __future__ import annotations

import numpy as np
import cv2

INTERPOLATIONS = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}


def as_bgr(image: np.ndarray) -> np.ndarray:
    """Any uint8 image (HxW gray, HxWx1, HxWx3 BGR, HxWx4 BGRA) -> HxWx3 BGR uint8."""
    if image is None or not isinstance(image, np.ndarray):
        raise ValueError("frame is not an image array")
    if image.dtype != np.uint8:
        if image.dtype == np.uint16:
            image = (image >> 8).astype(np.uint8)
        else:
            raise ValueError(f"frame dtype {image.dtype} not supported; give uint8 (or uint16) images")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise ValueError(f"frame shape {image.shape} not supported; give HxW or HxWx{{1,3,4}} images")


def fit_frame(frame: np.ndarray, height: int, width: int, resize: str = "area") -> np.ndarray:
    """BGR uint8 frame of any size -> (height, width, 3) BGR uint8, contiguous."""
    frame = as_bgr(frame)
    if frame.shape[0] != height or frame.shape[1] != width:
        interp = INTERPOLATIONS[resize]
        # INTER_AREA is only a good anti-aliasing filter when shrinking
        if resize == "area" and (frame.shape[0] < height or frame.shape[1] < width):
            interp = cv2.INTER_LINEAR
        if resize == "area":
            # OpenCV's area filter is ~40x faster for whole-number factors: shrink by the largest
            # whole factor first (exact box average), then by the remaining fraction
            k = min(frame.shape[0] // height, frame.shape[1] // width)
            if k >= 2:
                frame = cv2.resize(frame, (frame.shape[1] // k, frame.shape[0] // k), interpolation=cv2.INTER_AREA)
        frame = cv2.resize(frame, (width, height), interpolation=interp)
    return np.ascontiguousarray(frame)


def batch_frames(frames: list[np.ndarray], height: int, width: int, resize: str = "area") -> np.ndarray:
    """List of frames -> uint8 NHWC batch (BGR) ready for the graph."""
    out = np.empty((len(frames), height, width, 3), np.uint8)
    for i, f in enumerate(frames):
        out[i] = fit_frame(f, height, width, resize)
    return out


def resize_map(anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 HxW map -> (height, width), bilinear (for overlays on the original frame)."""
    if anomaly_map.shape == (height, width):
        return anomaly_map
    return cv2.resize(anomaly_map, (width, height), interpolation=cv2.INTER_LINEAR)
