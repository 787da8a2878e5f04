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
    if image.ndim not in (2, 3) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"frame shape {image.shape} is empty or not an image; give HxW or HxWx{{1,3,4}} images")
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


FIT_POLICIES = ("stretch", "letterbox", "center_crop")


def _resize(frame: np.ndarray, height: int, width: int, resize: str) -> np.ndarray:
    """Resize a BGR uint8 frame to exactly (height, width) with the named interpolation."""
    if frame.shape[0] == height and frame.shape[1] == width:
        return frame
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
    return cv2.resize(frame, (width, height), interpolation=interp)


def fit_geometry(frame_h: int, frame_w: int, height: int, width: int, fit: str) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """Integer geometry of a fit policy: (crop y0, x0, h, w) of the frame, (paste y0, x0, h, w) in the output.

    Integer arithmetic only (round half up), so the C++ runtime computes the same pixels.
    stretch: whole frame -> whole output (aspect not kept); center_crop: the largest centred
    region of the output's aspect; letterbox: the whole frame, aspect kept, centred on black.
    """
    if fit not in FIT_POLICIES:
        raise ValueError(f"fit policy {fit!r}: choose one of {', '.join(FIT_POLICIES)}")
    whole = (0, 0, frame_h, frame_w)
    if fit == "stretch":
        return whole, (0, 0, height, width)
    wider = frame_w * height >= frame_h * width  # frame aspect >= output aspect
    if fit == "center_crop":
        if wider:
            cw = max(1, min(frame_w, (frame_h * width + height // 2) // height))
            return (0, (frame_w - cw) // 2, frame_h, cw), (0, 0, height, width)
        ch = max(1, min(frame_h, (frame_w * height + width // 2) // width))
        return ((frame_h - ch) // 2, 0, ch, frame_w), (0, 0, height, width)
    if wider:
        nh = max(1, min(height, (frame_h * width + frame_w // 2) // frame_w))
        return whole, ((height - nh) // 2, 0, nh, width)
    nw = max(1, min(width, (frame_w * height + frame_h // 2) // frame_h))
    return whole, (0, (width - nw) // 2, height, nw)


def fit_frame(frame: np.ndarray, height: int, width: int, resize: str = "area", fit: str = "stretch") -> np.ndarray:
    """BGR uint8 frame of any size -> (height, width, 3) BGR uint8, contiguous.

    ``fit`` (recorded per artifact in the sidecar) says how a frame of another aspect is
    fitted: stretch, letterbox (black bars) or center_crop; see ``fit_geometry``.
    """
    frame = as_bgr(frame)
    if resize not in INTERPOLATIONS:
        raise ValueError(f"resize {resize!r}: choose one of {', '.join(INTERPOLATIONS)}")
    (cy, cx, ch, cw), (py, px, ph, pw) = fit_geometry(frame.shape[0], frame.shape[1], height, width, fit)
    frame = _resize(frame[cy:cy + ch, cx:cx + cw], ph, pw, resize)
    if (ph, pw) != (height, width):
        out = np.zeros((height, width, 3), np.uint8)
        out[py:py + ph, px:px + pw] = frame
        frame = out
    return np.ascontiguousarray(frame)


def batch_frames(frames: list[np.ndarray], height: int, width: int, resize: str = "area",
                 fit: str = "stretch") -> np.ndarray:
    """List of frames -> uint8 NHWC batch (BGR) ready for the graph."""
    out = np.empty((len(frames), height, width, 3), np.uint8)
    for i, f in enumerate(frames):
        out[i] = fit_frame(f, height, width, resize, fit)
    return out


def resize_map(anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 HxW map -> (height, width), bilinear (for overlays on the original frame)."""
    if anomaly_map.shape == (height, width):
        return anomaly_map
    return cv2.resize(anomaly_map, (width, height), interpolation=cv2.INTER_LINEAR)
