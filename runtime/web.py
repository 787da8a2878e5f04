"""Live web view of the line: one page with the live frame + heat map, OK/NG, counters, NG gallery.

    python -m runtime.stream --camera 0 --model model.onnx --serve 8080          # this machine only
    python -m runtime.stream --camera 0 --model model.onnx --serve 0.0.0.0:8080  # other screens too

Starlette + uvicorn (extra ``edgead[serve]``) in a thread of their own. The scoring thread only
swaps references under a lock (``on_frame``); an encoder thread draws the overlay and JPEG-encodes
the latest frame, at most ``max_fps`` times a second and only while someone watches. Each browser
gets the newest encoded frame when it is ready for one (MJPEG), so a slow or closed browser skips
frames for itself and never for the line.

Endpoints: ``/`` the page, ``/stream.mjpg`` MJPEG, ``/frame.jpg`` the latest frame, ``/api/status``
JSON (model, threshold, counters, current decision, gallery), ``/gallery/<frame_id>.jpg`` an NG
frame with its overlay, ``POST /api/reset`` (only with ``--serve-token``, header
``Authorization: Bearer TOKEN``).
"""
from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .changeover import class_from_json
from .observers import is_loopback

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
LIVE_MAX_WIDTH = 960  # live frames are downscaled to this width for the browser
THUMB_MAX_WIDTH = 480
WATCH_GRACE_S = 3.0  # keep encoding this long after the last request for a frame


def draw_overlay(frame: np.ndarray, anomaly_map: np.ndarray | None, score: float, is_ng: bool, pixel_thr: float,
                 max_width: int) -> np.ndarray:
    """The stream's heat-map overlay (red = anomalous), downscaled to at most ``max_width`` pixels wide."""
    h, w = frame.shape[:2]
    if w > max_width:
        frame = cv2.resize(frame, (max_width, round(h * max_width / w)), interpolation=cv2.INTER_AREA)
    if anomaly_map is None:
        return frame
    from .stream import overlay

    return overlay(frame, anomaly_map, score, is_ng, pixel_thr)


def _lower_priority() -> None:
    """Make the calling thread nicer than the scoring loop (Linux: per-thread nice); no-op elsewhere."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10))
    except (AttributeError, OSError):
        pass


class WebView:
    """Stream observer serving the live page. Thread-safe; ``on_frame`` never waits on a browser."""

    name = "web"

    def __init__(self, host: str, port: int, info: dict[str, Any], max_fps: float = 10.0, gallery: int = 12,
                 token: str | None = None, start: bool = True):
        self.host, self.port = host, port
        self.info = dict(info)
        self.max_fps = max_fps
        self.token = token or None
        self.pixel_thr = float(self.info.get("pixel_threshold") or 0.1)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._reset_counters()
        self._latest: tuple | None = None  # (seq, record, frame, map) - references only
        self._pending_ng: collections.deque = collections.deque(maxlen=gallery)
        self._gallery: collections.OrderedDict[int, tuple[dict, bytes]] = collections.OrderedDict()
        self._gallery_size = gallery
        self._jpeg: tuple[int, bytes] | None = None  # (seq, jpeg of the latest frame)
        self._jpeg_record: dict | None = None  # the record of the frame in self._jpeg
        self._watch_until = 0.0
        self.stats = {"frames_seen": 0, "frames_encoded": 0, "ng_thumbnails": 0, "ng_not_kept": 0, "requests": 0}
        self._encoder = threading.Thread(target=self._encode_loop, name="web-encode", daemon=True)
        self._encoder.start()
        self._classes = None  # runtime.changeover.ClassSwitch, attached by the stream
        self.server: uvicorn.Server | None = None
        self._server_thread: threading.Thread | None = None
        if start:
            self.start()

    # -- observer interface (scoring thread) ---------------------------------------------------
    def _reset_counters(self) -> None:
        self.parts = 0
        self.ng = 0
        self.since = time.time()
        self._times: collections.deque = collections.deque(maxlen=120)  # (monotonic, latency_ms)
        self.current: dict | None = None
        self.events: collections.deque = collections.deque(maxlen=20)

    def on_frame(self, record: dict, frame_bgr: np.ndarray, anomaly_map: np.ndarray | None) -> None:
        ng = record.get("decision") == "NG"
        amap = None if anomaly_map is None else np.array(anomaly_map, dtype=np.float32, copy=True)  # small
        with self._lock:
            self.parts += 1
            self.ng += ng
            self.current = record
            self._times.append((time.monotonic(), record.get("latency_ms")))
            seq = self.stats["frames_seen"] = self.stats["frames_seen"] + 1
            self._latest = (seq, record, frame_bgr, amap)
            if ng:
                if len(self._pending_ng) == self._pending_ng.maxlen:
                    self.stats["ng_not_kept"] += 1
                self._pending_ng.append((record, frame_bgr, amap))

    def on_event(self, record: dict) -> None:
        with self._lock:
            self.events.append(record)

    def attach_classes(self, switch) -> None:
        """The stream's product-class switch: the page shows the deciding class and, unlocked, changes it."""
        self._classes = switch

    def close(self) -> dict:
        self._closing.set()
        self._wake.set()
        if self.server is not None:
            self.server.should_exit = True
        if self._server_thread is not None:
            self._server_thread.join(timeout=5)
        self._encoder.join(timeout=2)
        with self._lock:
            return {"url": self.url, **self.stats}

    # -- encoder thread ----------------------------------------------------------------------------
    def _encode_loop(self) -> None:
        _lower_priority()  # drawing and JPEG encoding yield the CPU to the scoring thread
        last = 0.0
        while not self._closing.is_set():
            self._wake.wait(0.5 / self.max_fps)  # polls: the scoring thread never wakes this one
            self._wake.clear()
            with self._lock:
                # NG frames: kept for the gallery whether watched or not; if they come faster than
                # max_fps, only the newest ones are drawn (the gallery shows the last ones anyway)
                pending = list(self._pending_ng)[-max(1, int(self.max_fps)):]
                self.stats["ng_not_kept"] += len(self._pending_ng) - len(pending)
                self._pending_ng.clear()
                latest = self._latest
            for rec, frame, amap in pending:
                jpg = self._encode(rec, frame, amap, THUMB_MAX_WIDTH, quality=85)
                with self._lock:
                    self._gallery[int(rec.get("frame_id", 0))] = (rec, jpg)
                    while len(self._gallery) > self._gallery_size:
                        self._gallery.popitem(last=False)
                    self.stats["ng_thumbnails"] += 1
            now = time.monotonic()
            if latest is None or now > self._watch_until or (self._jpeg and self._jpeg[0] == latest[0]):
                continue
            if now - last < 1.0 / self.max_fps:
                time.sleep(1.0 / self.max_fps - (now - last))
                with self._lock:
                    latest = self._latest
            last = time.monotonic()
            seq, rec, frame, amap = latest
            jpg = self._encode(rec, frame, amap, LIVE_MAX_WIDTH, quality=80)
            with self._lock:
                self._jpeg = (seq, jpg)
                self._jpeg_record = rec
                self.stats["frames_encoded"] += 1

    def _encode(self, rec: dict, frame: np.ndarray, amap: np.ndarray | None, max_width: int, quality: int) -> bytes:
        img = draw_overlay(frame, amap, float(rec.get("score", 0.0)), rec.get("decision") == "NG", self.pixel_thr,
                           max_width)
        if img is frame:
            img = img.copy()  # never draw on the stream's frame
        h, w = img.shape[:2]
        scale = max(0.4, w / 1000)  # the part id, to match the picture with the page's verdict and gallery
        cv2.putText(img, f"part {rec.get('frame_id', '?')}", (10, h - int(12 * scale)), cv2.FONT_HERSHEY_SIMPLEX,
                    scale, (255, 255, 255), max(1, int(2 * scale)), cv2.LINE_AA)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
        return buf.tobytes() if ok else b""

    # -- what the page reads -------------------------------------------------------------------------
    def status(self) -> dict:
        with self._lock:
            times = list(self._times)
            gallery = [{**r, "frame_id": fid, "url": f"gallery/{fid}.jpg"}  # the frame's record: score(s), time
                       for fid, (r, _) in reversed(self._gallery.items())]
            # while the live image is watched, "current" is the part in that image, so the verdict and
            # the picture agree; otherwise the latest scored part
            watched = self._jpeg_record is not None and time.monotonic() < self._watch_until
            out = {"model": self.info, "parts": self.parts, "ng": self.ng,
                   "ng_rate": round(self.ng / self.parts, 4) if self.parts else 0.0,
                   "since": round(self.since, 3), "current": self._jpeg_record if watched else self.current,
                   "latest": self.current, "gallery": gallery,
                   "events": list(self.events)[-5:], "controls": self.token is not None,
                   "frame_seq": self._jpeg[0] if self._jpeg else 0}
        if self._classes is not None:
            out["class"], out["classes"] = self._classes.current, self._classes.classes
        fps = lat = None
        if len(times) >= 2 and times[-1][0] > times[0][0]:
            fps = round((len(times) - 1) / (times[-1][0] - times[0][0]), 2)
            if time.monotonic() - times[-1][0] > 2.0:
                fps = 0.0  # no frame for 2 s: the line (or the source) stopped
        vals = [t[1] for t in times if isinstance(t[1], (int, float))]
        if vals:
            lat = {"p50": round(float(np.percentile(vals, 50)), 2), "p90": round(float(np.percentile(vals, 90)), 2)}
        out["fps"], out["latency_ms"] = fps, lat
        return out

    def _watching(self) -> None:
        self._watch_until = time.monotonic() + WATCH_GRACE_S
        self._wake.set()

    def latest_jpeg(self) -> tuple[int, bytes] | None:
        with self._lock:
            return self._jpeg

    # -- HTTP ----------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def app(self) -> Starlette:
        async def index(request: Request) -> Response:
            return FileResponse(STATIC / "index.html", media_type="text/html")

        async def status(request: Request) -> Response:
            self.stats["requests"] += 1
            return JSONResponse(self.status(), headers={"Cache-Control": "no-store"})

        async def frame(request: Request) -> Response:
            self._watching()
            for _ in range(40):  # first request: the encoder needs a moment
                jpg = self.latest_jpeg()
                if jpg is not None or self._closing.is_set():
                    break
                await asyncio.sleep(0.05)
            if jpg is None:
                return Response("no frame yet", status_code=503, headers={"Retry-After": "1"})
            return Response(jpg[1], media_type="image/jpeg", headers={"Cache-Control": "no-store",
                                                                       "X-Frame-Seq": str(jpg[0])})

        async def mjpeg(request: Request) -> Response:
            async def parts():
                sent = -1
                while not self._closing.is_set():
                    self._watching()
                    jpg = self.latest_jpeg()
                    if jpg is not None and jpg[0] != sent:
                        sent = jpg[0]
                        yield (b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: " + str(len(jpg[1])).encode()
                               + b"\r\n\r\n" + jpg[1] + b"\r\n")
                    await asyncio.sleep(0.5 / self.max_fps)  # Starlette ends this when the browser goes away

            return StreamingResponse(parts(), media_type="multipart/x-mixed-replace; boundary=frame",
                                     headers={"Cache-Control": "no-store"})

        async def gallery(request: Request) -> Response:
            fid = request.path_params["fid"]
            with self._lock:
                item = self._gallery.get(fid)
            if item is None:
                return Response("not in the gallery (only the most recent NG frames are kept)", status_code=404)
            return Response(item[1], media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

        def refused(request: Request) -> Response | None:
            """The answer to a control request that is not allowed (None: allowed)."""
            if self.token is None:
                return JSONResponse({"error": "read-only: start the stream with --serve-token to enable controls"},
                                    status_code=403)
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return JSONResponse({"error": "wrong or missing token"}, status_code=401)
            return None

        async def reset(request: Request) -> Response:
            if (no := refused(request)) is not None:
                return no
            with self._lock:
                self._reset_counters()
            log.info("web: counters reset from %s", request.client.host if request.client else "?")
            return JSONResponse({"ok": True})

        async def product_class(request: Request) -> Response:
            """Product changeover: {"class": NAME} (null or "" = the global threshold), from the next frame."""
            if (no := refused(request)) is not None:
                return no
            if self._classes is None:
                return JSONResponse({"error": "this stream takes no class changes"}, status_code=409)
            try:
                body = await request.json()
            except ValueError:
                body = None  # not JSON: refused below, saying what to send
            try:
                name = class_from_json(body)
                thr = self._classes.request(name, requested_by="web")
            except ValueError as e:
                return JSONResponse({"error": str(e)}, status_code=400)
            log.info("web: class %s requested from %s", name or "(global)", request.client.host if request.client else "?")
            return JSONResponse({"ok": True, "class": name or None, "threshold": thr,
                                 "takes_effect": "from the next captured frame"})

        return Starlette(routes=[
            Route("/", index), Route("/api/status", status), Route("/frame.jpg", frame),
            Route("/stream.mjpg", mjpeg), Route("/gallery/{fid:int}.jpg", gallery),
            Route("/api/reset", reset, methods=["POST"]), Route("/api/class", product_class, methods=["POST"]),
        ])

    def start(self) -> None:
        """Bind (errors surface here, in the caller's thread) and serve in a daemon thread."""
        import socket

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as e:
            sock.close()
            self._closing.set()
            raise ValueError(f"--serve {self.host}:{self.port}: cannot listen ({e.strerror or e}); choose another "
                             "port or host") from e
        sock.listen(64)
        self.port = sock.getsockname()[1]  # port 0 = any free port
        config = uvicorn.Config(self.app(), log_level="warning", timeout_graceful_shutdown=1, access_log=False,
                                lifespan="off")
        self.server = uvicorn.Server(config)
        def serve() -> None:
            _lower_priority()
            self.server.run(sockets=[sock])

        self._server_thread = threading.Thread(target=serve, name="web", daemon=True)
        self._server_thread.start()
        if is_loopback(self.host):
            log.info("web view: %s (this machine only; --serve 0.0.0.0:%d to share it on the network)", self.url,
                     self.port)
        else:
            log.warning("web view: %s is reachable from the network, without a password; it is read-only%s",
                        self.url, "" if self.token is None else " except for holders of the --serve-token")
