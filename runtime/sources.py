"""Frame sources for the stream: camera, video file, RTSP, GStreamer, image folder, synthetic demo.

Every source yields (frame BGR uint8, source timestamp seconds) and says whether it is
live (frames arrive on their own clock and may be dropped) or a file (every frame matters).
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

from .dataset import IMAGE_SUFFIXES, DatasetError, read_image

log = logging.getLogger(__name__)

NETWORK_TIMEOUT_MS = 5000  # open and read timeout of network captures


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

    def __init__(self, target: int | str, kind: str):
        self.target, self.kind = target, kind
        self.live = kind in ("camera", "rtsp", "gstreamer")
        self.name = f"{kind}:{target}"
        self.cap = self._open()

    def _open(self) -> cv2.VideoCapture:
        if self.kind == "gstreamer":
            cap = cv2.VideoCapture(str(self.target), cv2.CAP_GSTREAMER)
        elif self.kind == "rtsp":  # any network URL: a dead peer must be noticed in seconds, not minutes
            cap = cv2.VideoCapture(str(self.target), cv2.CAP_ANY, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, NETWORK_TIMEOUT_MS,
                                                                   cv2.CAP_PROP_READ_TIMEOUT_MSEC, NETWORK_TIMEOUT_MS])
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
        """Frames until the file ends or the device/peer stops delivering (``ReconnectingSource`` goes on)."""
        while True:
            ok, frame = self.cap.read()
            if not ok or frame is None:
                return
            yield frame

    def close(self) -> None:
        self.cap.release()


class FolderSource(Source):
    """Images of a folder in name order. ``skip_unreadable``: warn and count (``skipped``) instead of raising."""

    def __init__(self, folder: str | Path, loop: bool = False, skip_unreadable: bool = False):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise SourceError(f"image folder {self.folder} not found")
        self.files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise SourceError(f"image folder {self.folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self.loop = loop
        self.skip_unreadable = skip_unreadable
        self.skipped = 0
        self.name = f"folder:{self.folder}"

    def frames(self) -> Iterator[np.ndarray]:
        while True:
            for p in self.files:
                try:
                    yield read_image(p)
                except DatasetError as e:
                    if not self.skip_unreadable:
                        raise
                    self.skipped += 1
                    log.warning("skipped frame: %s (%d skipped so far)", e, self.skipped)
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


class ReconnectingSource(Source):
    """A live source that never ends on its own: when frames stop it reconnects with back-off, forever.

    ``opener()`` returns a fresh inner source (e.g. a ``CaptureSource`` of an RTSP/HTTP URL); the
    first open happens here, so a wrong URL is an error at start, not an outage. An outage is
    logged once (WARNING when lost, INFO when back), reported through ``on_event`` as
    ``{"event": "source_lost", ...}`` / ``{"event": "source_back", "outage_s": ...}`` and counted
    in ``outages`` / ``outage_seconds``. ``interrupt()`` ends ``frames()`` (also during a back-off wait).
    """

    live = True

    def __init__(self, opener: Callable[[], Source], name: str, first_delay: float = 0.5, max_delay: float = 30.0):
        self.opener, self.name = opener, name
        self.first_delay, self.max_delay = first_delay, max_delay
        self.inner: Source | None = opener()
        self.on_event: Callable[[dict], None] | None = None
        self.outages = 0
        self._closed_outage_s = 0.0
        self._lost_at: float | None = None  # monotonic time of the current outage's start
        self._attempts = 0
        self._interrupt = threading.Event()

    @property
    def outage_seconds(self) -> float:
        """Total time without frames, the current outage included."""
        ongoing = time.monotonic() - self._lost_at if self._lost_at is not None else 0.0
        return self._closed_outage_s + ongoing

    def _emit(self, event: dict) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def _lost(self, reason: str) -> None:
        self._lost_at = time.monotonic()
        self._attempts = 0
        self.outages += 1
        log.warning("%s: source lost (%s); reconnecting with back-off (%.1f s up to %.0f s between tries), "
                    "scoring resumes when it returns", self.name, reason, self.first_delay, self.max_delay)
        self._emit({"event": "source_lost", "timestamp": round(time.time(), 6), "source": self.name, "reason": reason,
                    "outage": self.outages})

    def _back(self) -> None:
        outage = time.monotonic() - self._lost_at
        self._closed_outage_s += outage
        self._lost_at = None
        log.info("%s: source back after %.1f s (%d reconnect attempts)", self.name, outage, self._attempts)
        self._emit({"event": "source_back", "timestamp": round(time.time(), 6), "source": self.name,
                    "outage_s": round(outage, 3), "attempts": self._attempts, "outage": self.outages})

    def _reopen(self) -> Source | None:
        self._attempts += 1
        level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # one line per try from OpenCV otherwise
        try:
            return self.opener()
        except SourceError as e:
            log.debug("%s: reconnect attempt %d failed: %s", self.name, self._attempts, e)
            return None
        finally:
            cv2.utils.logging.setLogLevel(level)

    def frames(self) -> Iterator[np.ndarray]:
        delay = self.first_delay
        while not self._interrupt.is_set():
            if self.inner is not None:
                reason = "no more frames"
                try:
                    for frame in self.inner.frames():
                        if self._lost_at is not None:
                            self._back()
                        delay = self.first_delay
                        yield frame
                        if self._interrupt.is_set():
                            return
                except (SourceError, cv2.error, OSError) as e:
                    reason = str(e)
                self.inner.close()
                self.inner = None
                if self._interrupt.is_set():
                    return
                if self._lost_at is None:
                    self._lost(reason)
            if self._interrupt.wait(delay):
                return
            delay = min(self.max_delay, delay * 2)
            self.inner = self._reopen()

    def interrupt(self) -> None:
        self._interrupt.set()

    def close(self) -> None:
        self._interrupt.set()
        if self.inner is not None:
            self.inner.close()
            self.inner = None


def open_source(camera: int | None = None, video: str | None = None, rtsp: str | None = None,
                gstreamer: str | None = None, images: str | None = None, demo: bool = False,
                demo_frames: int | None = 200, loop: bool = False) -> Source:
    chosen = [x is not None and x is not False for x in (camera, video, rtsp, gstreamer, images, demo)]
    if sum(chosen) != 1:
        raise SourceError("choose exactly one source: --camera N, --video FILE, --rtsp URL, --gstreamer PIPELINE, "
                          "--images DIR or --demo")
    if camera is not None:  # a USB camera unplugged and plugged back is an outage too
        return ReconnectingSource(lambda: CaptureSource(int(camera), "camera"), f"camera:{camera}")
    if video is not None:
        if not Path(video).is_file():
            raise SourceError(f"video file {video} not found")
        return CaptureSource(str(video), "video")
    if rtsp is not None:
        return ReconnectingSource(lambda: CaptureSource(rtsp, "rtsp"), f"rtsp:{rtsp}")
    if gstreamer is not None:
        return ReconnectingSource(lambda: CaptureSource(gstreamer, "gstreamer"), f"gstreamer:{gstreamer}")
    if images is not None:
        return FolderSource(images, loop=loop, skip_unreadable=True)
    return DemoSource(n=demo_frames)
