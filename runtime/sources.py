"""Frame sources for the stream: camera, video file, RTSP, GStreamer, image folder, synthetic demo.

Every source yields (frame BGR uint8, source timestamp seconds) and says whether it is
live (frames arrive on their own clock and may be dropped) or a file (every frame matters).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from .dataset import IMAGE_SUFFIXES, read_image

log = logging.getLogger(__name__)


class SourceError(RuntimeError):
    """A source that cannot be opened or read; the message says what to check."""


class Source:
    live: bool = False
    name: str = "source"

    def frames(self) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class CaptureSource(Source):
    """OpenCV VideoCapture: camera index, video file, RTSP URL or GStreamer pipeline."""

    def __init__(self, target: int | str, kind: str, reconnect: bool = False, max_retries: int = 5):
        self.target, self.kind = target, kind
        self.live = kind in ("camera", "rtsp", "gstreamer")
        self.name = f"{kind}:{target}"
        self.reconnect = reconnect
        self.max_retries = max_retries
        self.cap = self._open()

    def _open(self) -> cv2.VideoCapture:
        if self.kind == "gstreamer":
            cap = cv2.VideoCapture(str(self.target), cv2.CAP_GSTREAMER)
        else:
            cap = cv2.VideoCapture(self.target)
        if not cap.isOpened():
            hint = {"camera": "check the index (try 0, 1), that no other program holds it, and permissions on /dev/video*",
                    "video": "check the path and that OpenCV can decode the codec",
                    "rtsp": "check the URL, credentials and network",
                    "gstreamer": "check the pipeline and that OpenCV was built with GStreamer"}[self.kind]
            raise SourceError(f"cannot open {self.kind} {self.target!r}: {hint}")
        return cap

    def frames(self) -> Iterator[np.ndarray]:
        retries = 0
        while True:
            ok, frame = self.cap.read()
            if ok and frame is not None:
                retries = 0
                yield frame
                continue
            if not (self.reconnect and self.live):
                return  # end of file, or a dead camera: stop cleanly
            retries += 1
            if retries > self.max_retries:
                raise SourceError(f"{self.name}: stream lost and {self.max_retries} reconnects failed; giving up")
            delay = min(30.0, 0.5 * 2 ** retries)
            log.warning("%s: stream lost, reconnecting in %.1fs (try %d/%d)", self.name, delay, retries, self.max_retries)
            time.sleep(delay)
            self.cap.release()
            try:
                self.cap = self._open()
            except SourceError as e:
                log.warning("%s", e)

    def close(self) -> None:
        self.cap.release()


class FolderSource(Source):
    def __init__(self, folder: str | Path, loop: bool = False):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise SourceError(f"image folder {self.folder} not found")
        self.files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise SourceError(f"image folder {self.folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self.loop = loop
        self.name = f"folder:{self.folder}"

    def frames(self) -> Iterator[np.ndarray]:
        while True:
            for p in self.files:
                yield read_image(p)
            if not self.loop:
                return


class DemoSource(Source):
    """Synthetic conveyor: parts with occasional defects, paced at ``fps`` like a camera."""

    live = True

    def __init__(self, n: int | None = 200, fps: float = 30.0, size: int = 256, seed: int = 0,
                 frame_size: tuple[int, int] | None = None):
        self.n, self.fps, self.size, self.seed, self.frame_size = n, fps, size, seed, frame_size
        self.name = "demo"

    def frames(self) -> Iterator[np.ndarray]:
        from .synthetic import conveyor_frames

        period = 1.0 / self.fps if self.fps > 0 else 0.0
        next_t = time.perf_counter()
        for frame, _ in conveyor_frames(self.n, self.size, self.seed, frame_size=self.frame_size):
            if period:
                next_t += period
                delay = next_t - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            yield frame


def open_source(camera: int | None = None, video: str | None = None, rtsp: str | None = None,
                gstreamer: str | None = None, images: str | None = None, demo: bool = False,
                demo_frames: int | None = 200, loop: bool = False) -> Source:
    chosen = [x is not None and x is not False for x in (camera, video, rtsp, gstreamer, images, demo)]
    if sum(chosen) != 1:
        raise SourceError("choose exactly one source: --camera N, --video FILE, --rtsp URL, --gstreamer PIPELINE, "
                          "--images DIR or --demo")
    if camera is not None:
        return CaptureSource(int(camera), "camera")
    if video is not None:
        if not Path(video).is_file():
            raise SourceError(f"video file {video} not found")
        return CaptureSource(str(video), "video")
    if rtsp is not None:
        return CaptureSource(rtsp, "rtsp", reconnect=True)
    if gstreamer is not None:
        return CaptureSource(gstreamer, "gstreamer", reconnect=True)
    if images is not None:
        return FolderSource(images, loop=loop)
    return DemoSource(n=demo_frames)
