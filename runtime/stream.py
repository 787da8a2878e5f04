"""Real-time scoring of a camera (or video, RTSP, GStreamer, folder, demo) stream.

    python -m runtime.stream --camera 0 --model model.onnx
    python -m runtime.stream --demo --model model.onnx --headless --jsonl out.jsonl

A capture thread feeds a bounded buffer. For live sources the policy is "latest":
when inference is slower than the camera, the oldest waiting frame is dropped (and
counted) so latency stays bounded. Files use "block": every frame is scored.
One JSON line per scored frame; a summary (fps, latency percentiles, drops, NG count,
stream overhead) at the end, also on Ctrl-C.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import logging
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

import cv2
import numpy as np

from .artifact import ArtifactError, atomic_write_text
from .backends.base import ServerUnavailable
from .changeover import ClassSetting, ClassSwitch
from .model import is_ng
from .observers import ObserverSet, add_observer_args, build_observers
from .preprocess import as_bgr
from .savers import JsonlWriter, NgSaver
from .sources import Source, SourceError, open_source
from .stats import StreamStats

log = logging.getLogger(__name__)

DEFAULT_INFLIGHT_REMOTE = 2  # batches in flight to an inference server (--inflight)


@dataclass
class Summary:
    frames_scored: int = 0
    frames_captured: int = 0
    frames_dropped: int = 0
    ng_count: int = 0
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time (all its threads) while streaming: what scoring costs here
    fps: float = 0.0
    latency_ms_p50: float = 0.0
    latency_ms_p90: float = 0.0
    latency_ms_p99: float = 0.0
    model_ms_mean: float = 0.0
    overhead_fraction: float = 0.0  # share of the scoring loop's busy time not spent in the model call
    idle_fraction: float = 0.0  # share of wall time spent waiting for frames (camera slower than model)
    provider: str = ""
    server_reconnects: int = 0  # times a remote inference server (--server) was lost and found again
    stopped_by: str = "end of stream"
    error: str | None = None
    ng_saved: list[str] = field(default_factory=list)  # the last 100 saved paths (bounded); ng_saved_count has them all
    ng_saved_count: int = 0
    ng_unsaved: int = 0  # NG images that could not be written (disk full, folder gone)
    jsonl_unsaved: int = 0  # JSON lines that could not be written
    frames_skipped: int = 0  # unreadable frames skipped with a warning
    source_outages: int = 0  # times a live source was lost (and reconnected, or still lost at the end)
    source_outage_seconds: float = 0.0
    class_changes: list[dict] = field(default_factory=list)  # product changeovers: {frame_id, class, threshold, by}
    observers: dict = field(default_factory=dict)  # counters of the web view / MQTT publisher, by name


def overlay(frame: np.ndarray, anomaly_map: np.ndarray, score: float, is_ng: bool, pixel_thr: float = 0.1) -> np.ndarray:
    """Heat-map overlay (red = anomalous) with score and OK/NG, at the frame's own size."""
    h, w = frame.shape[:2]
    m = cv2.resize(anomaly_map.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap(np.clip(m / (2 * pixel_thr) * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    out = cv2.addWeighted(frame, 0.6, heat, 0.4, 0)
    colour = (0, 0, 255) if is_ng else (0, 200, 0)
    scale = max(0.5, w / 800)
    cv2.putText(out, f"{'NG' if is_ng else 'OK'}  {score:.2f}", (10, int(30 * scale)), cv2.FONT_HERSHEY_SIMPLEX,
                scale, colour, max(1, int(2 * scale)), cv2.LINE_AA)
    return out


class _Buffer:
    """Bounded frame buffer: "latest" drops the oldest when full, "block" makes the producer wait."""

    def __init__(self, capacity: int, policy: str):
        self.items: collections.deque = collections.deque()
        self.capacity = capacity
        self.policy = policy
        self.cond = threading.Condition()
        self.closed = False
        self.dropped = 0
        self.captured = 0

    def put(self, item) -> bool:
        with self.cond:
            while self.policy == "block" and len(self.items) >= self.capacity and not self.closed:
                self.cond.wait(0.1)
            if self.closed:
                return False
            if len(self.items) >= self.capacity:
                self.items.popleft()
                self.dropped += 1
            self.items.append(item)
            self.captured += 1
            self.cond.notify_all()
            return True

    def take(self, n: int, timeout: float = 0.5) -> list | None:
        """Up to n items; [] on timeout; None once closed and empty."""
        with self.cond:
            if not self.items:
                if self.closed:
                    return None
                self.cond.wait(timeout)
                if not self.items:
                    return None if self.closed else []
            k = min(n, len(self.items))
            out = [self.items.popleft() for _ in range(k)]
            self.cond.notify_all()
            return out

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class _Job:
    """One batch on its way through the model: its frames, the prepared tensor, the call (inline or a future)."""

    __slots__ = ("items", "prepared", "t_sent", "reconnects", "future", "out", "t_done")

    def __init__(self, items: list, prepared: np.ndarray, t_sent: float, reconnects: int):
        self.items, self.prepared, self.t_sent, self.reconnects = items, prepared, t_sent, reconnects
        self.future: concurrent.futures.Future | None = None
        self.out: dict[str, np.ndarray] | None = None
        self.t_done = t_sent


class Stream:
    """Capture thread + scoring loop around a ``runtime.model.Model`` (or anything with its API)."""

    def __init__(self, model, source: Source, batch: int = 1, policy: str | None = None, sink: IO[str] | None = None,
                 save_ng: str | Path | None = None, show: bool = False, max_frames: int | None = None,
                 report_every: float = 5.0, reconnect_delay: float = 0.5, max_reconnects: int = 5,
                 reconnect_max_delay: float = 30.0, observers: list | None = None, outage_after: float = 2.0,
                 inflight: int | None = None):
        self.model, self.source = model, source
        self.batch = max(1, batch)
        # batches in flight: with a remote server (Triton) the next frames are prepared and sent while the
        # server works on the previous ones, so the network hop and the camera side overlap with inference
        # (results still come out in frame order). Local engines score one batch at a time.
        remote = getattr(getattr(model, "backend", None), "name", "") == "triton"
        self.inflight = max(1, inflight if inflight is not None else (DEFAULT_INFLIGHT_REMOTE if remote else 1))
        self._outputs: list[str] | None = None  # a remote server sends back only what this stream uses
        self.policy = policy or ("latest" if source.live else "block")
        if self.policy not in ("latest", "block"):
            raise ValueError(f"policy {self.policy!r}: choose latest or block")
        self.buffer = _Buffer(capacity=self.batch if self.policy == "latest" else 4 * self.batch, policy=self.policy)
        self.sink = sink
        self.save_ng = NgSaver(save_ng) if save_ng else None
        self.show = show
        self.max_frames = max_frames
        self.report_every = report_every
        self.reconnect_delay, self.max_reconnects = reconnect_delay, max_reconnects
        self.reconnect_max_delay = reconnect_max_delay
        self.reconnects = 0
        self._stop = threading.Event()
        self._capture_error: BaseException | None = None
        self.observers = ObserverSet(observers)  # runtime.observers: web view, MQTT; never slow the loop
        # product changeover (runtime.changeover): the web view / MQTT may switch the deciding class mid-stream
        self.classes = ClassSwitch.for_model(model)
        self._setting = self.classes.at(0)
        for obs in self.observers.observers:
            attach = getattr(obs, "attach_classes", None)
            if attach is not None:
                attach(self.classes)
        if remote:  # the scores always; the anomaly map only for overlays (window, NG images, web view, MQTT)
            self._outputs = ["image_score", *getattr(model, "components", [])]
            if show or save_ng or observers:
                self._outputs.append("anomaly_map")
        self.outage_after = outage_after  # a live source silent this long is reported as an outage
        self._last_frame_t = time.perf_counter()
        self._outage_since: float | None = None
        self.frames_skipped = 0
        self._events: collections.deque = collections.deque()  # source events for the JSONL, from the capture thread
        # a source that reports its own outages (ReconnectingSource: source_lost/source_back) is not also
        # watched for silence, else observers get two messages for one outage
        self._source_reports_outages = hasattr(source, "on_event")
        if self._source_reports_outages:
            source.on_event = self._events.append

    def _watch_source(self, got_frames: bool) -> None:
        """Report a live source that went silent (source_outage) and came back (source_recovered); only for
        sources without their own outage events."""
        if self._source_reports_outages:
            return
        now = time.perf_counter()
        if got_frames:
            if self._outage_since is not None:
                self.observers.event("source_recovered", source=self.source.name,
                                     outage_s=round(now - self._outage_since, 3))
                self._outage_since = None
            self._last_frame_t = now
        elif (self._outage_since is None and self.source.live and self.observers
              and now - self._last_frame_t >= self.outage_after):
            self._outage_since = self._last_frame_t
            log.warning("%s: no frame for %.1f s", self.source.name, now - self._last_frame_t)
            self.observers.event("source_outage", source=self.source.name, silent_s=round(now - self._last_frame_t, 3))

    def stop(self) -> None:
        self._stop.set()
        self.buffer.close()
        interrupt = getattr(self.source, "interrupt", None)
        if interrupt is not None:  # a source waiting to reconnect stops waiting
            interrupt()

    def _write_events(self) -> None:
        while self._events:
            event = self._events.popleft()
            if self.sink is not None:
                self.sink.write(json.dumps(event) + "\n")
            if self.observers:  # the web view and MQTT see every source outage too
                fields = {k: v for k, v in event.items() if k != "event"}
                self.observers.event(str(event.get("event", "source_event")), **fields)

    def _capture(self) -> None:
        fid = 0
        try:
            for frame in self.source.frames():
                if self._stop.is_set():
                    break
                try:
                    frame = as_bgr(frame)
                except ValueError as e:  # one bad frame must not stop the line
                    self.frames_skipped += 1
                    log.warning("skipped frame %d: %s (%d skipped so far)", fid, e, self.frames_skipped)
                    continue
                self.classes.stamp(fid)  # a changeover asked for by now decides this frame on
                if not self.buffer.put((fid, time.time(), time.perf_counter(), frame)):
                    break
                fid += 1
                if self.max_frames is not None and fid >= self.max_frames:
                    break
        except BaseException as e:  # reported by the scoring loop, which owns the summary
            self._capture_error = e
        finally:
            self.buffer.close()

    def _server_lost(self, e: BaseException, n_frames: int) -> bool:
        """A remote server gone: reconnect with back-off like a dropped camera. "latest" counts the ``n_frames``
        it could not score as dropped (stale by then). False if the stream was stopped meanwhile; raises
        ServerUnavailable after ``max_reconnects`` failed tries."""
        log.warning("%s", e)
        if self.policy == "latest":
            self._count_dropped(n_frames)
            log.warning("%d frame(s) counted as dropped", n_frames)
        for attempt in range(1, self.max_reconnects + 1):
            if self._stop.is_set():
                return False
            log.warning("inference server lost, reconnecting in %.1fs (try %d/%d)",
                        min(self.reconnect_max_delay, self.reconnect_delay * 2 ** attempt), attempt,
                        self.max_reconnects)
            if self.model.backend.wait_ready(attempt, base=self.reconnect_delay, max_delay=self.reconnect_max_delay):
                self.reconnects += 1
                log.warning("inference server back after %d tries", attempt)
                return True
        raise ServerUnavailable(f"inference server lost and {self.max_reconnects} reconnects failed; "
                                "giving up (check the server, then restart the stream)") from e

    def _count_dropped(self, n_frames: int) -> None:
        """Frames that were captured but will never be scored (the summary's frames_dropped)."""
        with self.buffer.cond:
            self.buffer.dropped += n_frames

    def _call(self, prepared: np.ndarray) -> dict[str, np.ndarray]:
        if self._outputs is None:
            return self.model.infer(prepared)
        return self.model.infer(prepared, outputs=self._outputs)

    def _timed_call(self, job: "_Job") -> dict[str, np.ndarray]:
        out = self._call(job.prepared)
        job.t_done = time.perf_counter()  # set before the future completes: its reader sees it
        return out

    def _infer(self, prepared: np.ndarray) -> dict[str, np.ndarray] | None:
        """The model call. A remote server gone -> reconnect; then "block" scores the same frames again (none
        lost), "latest" counts them dropped and gives None."""
        while True:
            try:
                return self._call(prepared)
            except ServerUnavailable as e:
                if not self._server_lost(e, len(prepared)) or self.policy == "latest":
                    return None

    def _submit(self, items: list, pool: concurrent.futures.Executor | None) -> "_Job":
        """Prepare a batch and start its model call: inline (one batch at a time) or on the pool (in flight)."""
        prepared = self.model.prepare([it[3] for it in items])
        job = _Job(items, prepared, time.perf_counter(), self.reconnects)
        if pool is None:
            job.out = self._infer(prepared)
            job.t_done = time.perf_counter()
        else:
            job.future = pool.submit(self._timed_call, job)
        return job

    def _result(self, job: "_Job") -> dict[str, np.ndarray] | None:
        """The outputs of a job, waiting for it; None when its frames were counted as dropped."""
        if job.future is None:
            return job.out
        try:
            return job.future.result()
        except ServerUnavailable as e:
            if self.reconnects == job.reconnects:  # the first job to meet this outage reconnects
                if not self._server_lost(e, len(job.prepared)) or self.policy == "latest":
                    return None
            elif self.policy == "latest":  # sent before an outage already recovered from: stale, dropped
                self._count_dropped(len(job.prepared))
                return None
            job.t_sent = time.perf_counter()
            out = self._infer(job.prepared)  # "block": score the same frames again, in their place in the order
            job.t_done = time.perf_counter()
            return out

    def run(self) -> Summary:
        summary = Summary(provider=getattr(self.model, "provider", ""))
        stats = StreamStats()  # fixed memory however long the stream runs
        busy = 0.0
        thread = threading.Thread(target=self._capture, name="capture", daemon=True)
        t_start, cpu_start = time.perf_counter(), time.process_time()
        self.observers.event("stream_started", source=self.source.name, provider=summary.provider)
        thread.start()
        last_report = t_start
        self._last_frame_t = t_start
        pending: collections.deque[_Job] = collections.deque()  # in frame order
        pool = (concurrent.futures.ThreadPoolExecutor(self.inflight, thread_name_prefix="infer")
                if self.inflight > 1 else None)
        try:
            while pending or not self._stop.is_set():
                if len(pending) < self.inflight and not self._stop.is_set():
                    items = self.buffer.take(self.batch, timeout=0.0 if pending else 0.5)
                    self._write_events()
                    if items is not None:
                        self._watch_source(bool(items))
                    if items:
                        t_busy = time.perf_counter()
                        pending.append(self._submit(items, pool))
                        busy += time.perf_counter() - t_busy
                        continue
                    if not pending:
                        if items is None:  # source ended and every frame is scored
                            break
                        continue
                # the window is full, or no frame is waiting: finish the oldest batch (results in frame order)
                t_busy = time.perf_counter()
                job = pending.popleft()
                out = self._result(job)
                if out is None:  # server was gone: these frames are counted as dropped
                    continue
                self._emit(job, out, summary, stats)
                now = time.perf_counter()
                busy += now - t_busy
                if now - last_report >= self.report_every:
                    last_report = now
                    p50, p99 = stats.recent_percentiles((50, 99))
                    log.info("%.1f fps | latency p50 %.1f ms p99 %.1f ms | dropped %d | NG %d",
                             summary.frames_scored / (now - t_start), p50, p99, self.buffer.dropped, summary.ng_count)
        except KeyboardInterrupt:
            summary.stopped_by = "Ctrl-C"
        except Exception as e:  # keep what was scored; report the cause in one line
            summary.stopped_by = "error"
            summary.error = f"{type(e).__name__}: {e}"
            log.error("stream stopped: %s", summary.error)
        finally:
            self.stop()
            if pool is not None:  # requests still in flight after an error or Ctrl-C are not waited for
                pool.shutdown(wait=False, cancel_futures=True)
            thread.join(timeout=5)
            self.source.close()
            self._write_events()
            if self.sink is not None:
                self.sink.flush()
            if self.show:
                cv2.destroyAllWindows()
        if self._capture_error is not None and summary.error is None:
            summary.stopped_by = "error"
            summary.error = f"{type(self._capture_error).__name__}: {self._capture_error}"
        wall = time.perf_counter() - t_start
        summary.wall_seconds = round(wall, 3)
        summary.cpu_seconds = round(time.process_time() - cpu_start, 3)
        summary.frames_captured = self.buffer.captured
        summary.frames_dropped = self.buffer.dropped
        summary.server_reconnects = self.reconnects
        self._fill_field_counts(summary)
        if summary.frames_scored:
            summary.fps = round(summary.frames_scored / wall, 2)
            p = stats.percentiles((50, 90, 99))  # within 1 % (log histogram), see runtime.stats
            summary.latency_ms_p50, summary.latency_ms_p90, summary.latency_ms_p99 = (round(float(v), 3) for v in p)
            summary.model_ms_mean = round(stats.model_ms_mean, 3)
            summary.overhead_fraction = round(max(0.0, 1 - stats.model_ms_sum / 1e3 / busy), 4)
            summary.idle_fraction = round(max(0.0, 1 - busy / wall), 4)
        if self.observers:
            self.observers.event("stream_stopped", source=self.source.name, stopped_by=summary.stopped_by,
                                 error=summary.error, frames_scored=summary.frames_scored, ng_count=summary.ng_count)
            summary.observers = self.observers.close()
        return summary

    def _emit(self, job: "_Job", out: dict[str, np.ndarray], summary: Summary, stats: StreamStats) -> None:
        """Decisions, JSONL, overlays and observers for one scored batch, frame by frame."""
        items = job.items
        pred = self.model.to_prediction(out)
        per_frame_model = (job.t_done - job.t_sent) / len(items)  # request sent -> answer (in flight: overlaps)
        for i, (fid, ts, t_cap, frame) in enumerate(items):
            setting = self.classes.at(fid)
            if setting is not self._setting:
                self._class_changed(setting, fid, summary)
            score = float(pred.image_score[i])
            ng = bool(is_ng(pred.image_score[i], setting.threshold))  # the class this frame was captured under
            done = time.perf_counter()
            latency_ms = (done - t_cap) * 1e3
            stats.add(latency_ms, per_frame_model * 1e3)
            summary.ng_count += ng
            rec = {"timestamp": round(ts, 6), "frame_id": fid, "score": round(score, 6),
                   "scores": {k: round(float(v[i]), 6) for k, v in pred.scores.items()},
                   "decision": "NG" if ng else "OK", "latency_ms": round(latency_ms, 3),
                   "model_ms": round(per_frame_model * 1e3, 3)}
            if setting.name is not None:  # a multi-class model deciding by a product class's threshold
                rec["class"], rec["threshold"] = setting.name, round(setting.threshold, 6)
            view = overlay(frame, pred.anomaly_map[i], score, ng) if self.show or (
                ng and self.save_ng is not None) else None  # drawn once, saved and/or shown
            if ng and self.save_ng is not None:
                path = self.save_ng.save(f"ng_{fid:06d}.jpg", view)  # None when the disk is full
                if path is not None:
                    rec["saved"] = path
            if self.sink is not None:
                self.sink.write(json.dumps(rec) + "\n")
            if self.observers:
                self.observers.frame(rec, frame, pred.anomaly_map[i])
            if self.show:
                cv2.imshow("edgead", view)
                if cv2.waitKey(1) & 0xFF in (27, ord("q")):
                    summary.stopped_by = "user (q)"
                    self.stop()
        summary.frames_scored += len(items)

    def _class_changed(self, setting: ClassSetting, fid: int, summary: Summary) -> None:
        """A product changeover reached the scoring loop: say so in the JSONL, to observers and in the summary."""
        prev, self._setting = self._setting, setting
        change = {"frame_id": fid, "class": setting.name, "threshold": round(setting.threshold, 6),
                  "previous_class": prev.name, "by": setting.requested_by}
        log.info("changeover from frame %d: class %s (threshold %.4g), was %s", fid, setting.name or "(global)",
                 setting.threshold, prev.name or "(global)")
        if len(summary.class_changes) < 100:
            summary.class_changes.append(change)
        if self.sink is not None:
            self.sink.write(json.dumps({"event": "class_changed", "timestamp": round(time.time(), 6), **change}) + "\n")
        self.observers.event("class_changed", **change)

    def _fill_field_counts(self, summary: Summary) -> None:
        """What went wrong in the field and was survived: unsaved writes, skipped frames, source outages."""
        if self.save_ng is not None:
            summary.ng_saved = self.save_ng.saved.tolist()
            summary.ng_saved_count = self.save_ng.saved.count
            summary.ng_unsaved = self.save_ng.unsaved
        summary.jsonl_unsaved = getattr(self.sink, "unsaved", 0)
        summary.frames_skipped = self.frames_skipped + getattr(self.source, "skipped", 0)
        summary.source_outages = getattr(self.source, "outages", 0)
        summary.source_outage_seconds = round(getattr(self.source, "outage_seconds", 0.0), 3)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.stream", description="Score a live stream frame by frame: "
                                "image score, anomaly map, OK/NG.")
    src = p.add_argument_group("source (choose one)")
    src.add_argument("--camera", type=int, help="camera index (0 = first camera)")
    src.add_argument("--video", help="video file")
    src.add_argument("--rtsp", help="network stream URL: rtsp://, http:// (MJPEG), udp:// (reconnects with back-off, "
                     "never gives up)")
    src.add_argument("--gstreamer", help="GStreamer pipeline ending in appsink (Jetson CSI cameras)")
    src.add_argument("--images", help="folder of images")
    src.add_argument("--demo", action="store_true", help="synthetic conveyor of parts (no camera needed)")
    p.add_argument("--model", help="model.onnx / model.engine / model.pt2 (sidecar next to it); with --server optional: "
                   "the served model's digest must then equal this artifact's")
    p.add_argument("--server", help="score on a Triton server instead: grpc://HOST:8001 or http://HOST:8000 "
                   "(pip install edgead[triton]; repository from `python -m export triton`)")
    p.add_argument("--model-name", help="with --server: the model's name in the server's repository")
    p.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt", "torch"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, tensorrt (onnxruntime provider)")
    p.add_argument("--class", dest="class_name", metavar="NAME",
                   help="multi-class model: use this product class's threshold (default: the global one)")
    p.add_argument("--batch", type=int, default=1, help="micro-batch size")
    p.add_argument("--inflight", type=int, help="batches in flight to the inference server, so preparing and sending "
                   f"overlap with inference; results stay in frame order (default {DEFAULT_INFLIGHT_REMOTE} with "
                   "--server, 1 locally)")
    p.add_argument("--policy", choices=["latest", "block"], help="latest: drop stale frames (live default); block: score all")
    p.add_argument("--max-frames", type=int, help="stop after this many captured frames")
    p.add_argument("--demo-frames", type=int, default=200, help="length of the --demo stream (0 = endless)")
    p.add_argument("--headless", action="store_true", help="no window (always true without a display)")
    p.add_argument("--jsonl", help="write per-frame JSON lines here instead of stdout ('-' = stdout)")
    p.add_argument("--save-ng", help="folder to save NG frames with their heat-map overlay")
    p.add_argument("--summary", help="write the end-of-run summary JSON here")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-frame JSON on stdout")
    add_observer_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    from .model import Model

    if args.inflight is not None and args.inflight < 1:
        print(f"error: --inflight {args.inflight}: give 1 or more", file=sys.stderr)
        return 2
    try:
        source = open_source(args.camera, args.video, args.rtsp, args.gstreamer, args.images, args.demo,
                             demo_frames=args.demo_frames or None)
        if not (args.model or args.server) or (args.server and not args.model_name):
            raise ArtifactError("give --model PATH, or --server URL with --model-name NAME")
        model = Model(args.model, backend=args.backend, device=args.device, server=args.server,
                      model_name=args.model_name, class_name=args.class_name)
    except (SourceError, ArtifactError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:  # --serve / --mqtt (runtime.observers); bad flag or missing extra -> exit 2
        observers = build_observers(args, model, source)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        source.close()
        return 2
    sink_file = None
    if args.jsonl and args.jsonl != "-":
        try:
            sink_file = JsonlWriter(args.jsonl)  # survives a full disk, never leaves a partial line
        except ArtifactError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        sink = sink_file
    else:
        sink = None if args.quiet else sys.stdout
    show = not args.headless
    if show:
        import os

        if not os.environ.get("DISPLAY") and sys.platform.startswith("linux"):
            log.info("no DISPLAY: running headless")
            show = False
    try:
        stream = Stream(model, source, batch=args.batch, policy=args.policy, sink=sink, save_ng=args.save_ng,
                        show=show, max_frames=args.max_frames, observers=observers, inflight=args.inflight)
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: stream.stop())
    summary = stream.run()
    if sink_file:
        sink_file.close()
    text = json.dumps(asdict(summary), indent=2)
    log.info("summary:\n%s", text)
    if args.summary:
        try:
            atomic_write_text(args.summary, text + "\n")
        except (OSError, ArtifactError) as e:  # the summary is in the log above
            log.error("summary not written to %s: %s", args.summary, e)
    return 1 if summary.error else 0


if __name__ == "__main__":
    sys.exit(main())
