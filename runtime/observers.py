"""Observers of the stream: things that watch decisions without ever slowing the scoring loop.

An observer has three methods, called from the scoring thread:

    on_frame(record: dict, frame_bgr: np.ndarray, anomaly_map: np.ndarray | None) -> None
        record is the frame's JSON line (as written to --jsonl); frame_bgr the captured frame
        (uint8 HxWx3, not to be modified); anomaly_map float32 [h,w] at the graph's input size.
    on_event(record: dict) -> None
        a stream event: {"event": "stream_started" | "source_outage" | "source_recovered" |
        "stream_stopped" | ..., "timestamp": unix seconds, ...}.
    close() -> dict
        stop, and return counters for the run summary (under summary["observers"][name]).

on_frame and on_event must return at once (hand the data to the observer's own thread and
drop when behind); ``notify`` below also contains any exception so one broken observer can
neither stop nor slow the line.

This module imports only the standard library: the web view (``runtime.web``, extra
``edgead[serve]``) and the MQTT publisher (``runtime.mqtt``, extra ``edgead[mqtt]``) are
imported only when their flags are given.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import time
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Observer(Protocol):
    name: str

    def on_frame(self, record: dict, frame_bgr: Any, anomaly_map: Any) -> None: ...

    def on_event(self, record: dict) -> None: ...

    def close(self) -> dict: ...


class ObserverSet:
    """Calls every observer, logs (once per observer) and counts its exceptions instead of raising."""

    def __init__(self, observers: list[Observer] | None):
        self.observers = list(observers or [])
        self.errors: dict[str, int] = {}
        self.cost: dict[int, list[float]] = {id(o): [0.0, 0.0, 0] for o in self.observers}  # total s, max s, calls

    def __bool__(self) -> bool:
        return bool(self.observers)

    def _call(self, obs: Observer, method: str, *args) -> None:
        try:
            getattr(obs, method)(*args)
        except Exception as e:  # an observer must never stop the line
            name = getattr(obs, "name", type(obs).__name__)
            self.errors[name] = self.errors.get(name, 0) + 1
            if self.errors[name] == 1:
                log.error("observer %s failed in %s (%s: %s); scoring goes on, further errors are only counted",
                          name, method, type(e).__name__, e)

    def frame(self, record: dict, frame_bgr: Any, anomaly_map: Any) -> None:
        for obs in self.observers:
            t0 = time.perf_counter()
            self._call(obs, "on_frame", record, frame_bgr, anomaly_map)
            dt = time.perf_counter() - t0  # what the scoring thread paid for this observer
            c = self.cost[id(obs)]
            c[0] += dt
            c[1] = max(c[1], dt)
            c[2] += 1

    def event(self, event: str, **fields: Any) -> None:
        rec = {"event": event, "timestamp": round(time.time(), 6), **fields}
        for obs in self.observers:
            self._call(obs, "on_event", rec)

    def close(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for obs in self.observers:
            name = getattr(obs, "name", type(obs).__name__)
            try:
                out[name] = dict(obs.close() or {})
            except Exception as e:
                log.error("observer %s failed to close: %s: %s", name, type(e).__name__, e)
                out[name] = {"close_error": f"{type(e).__name__}: {e}"}
            if self.errors.get(name):
                out[name]["observer_errors"] = self.errors[name]
            total, worst, calls = self.cost[id(obs)]
            out[name]["on_frame_ms_mean"] = round(1e3 * total / calls, 4) if calls else 0.0
            out[name]["on_frame_ms_max"] = round(1e3 * worst, 3)
        return out


def parse_host_port(text: str, flag: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """'HOST:PORT', ':PORT' or 'PORT' -> (host, port); ValueError naming the flag otherwise."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or default_host
    try:
        p = int(port)
        if not 0 <= p <= 65535:
            raise ValueError
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected HOST:PORT or PORT, e.g. {flag} 127.0.0.1:8080") from None
    return host, p


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; a name or wildcard (0.0.0.0, ::) is not loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_observer_args(p: argparse.ArgumentParser) -> None:
    """The --serve and --mqtt flags of ``python -m runtime.stream``."""
    web = p.add_argument_group("live web view (needs: pip install 'edgead[serve]')")
    web.add_argument("--serve", metavar="[HOST:]PORT",
                     help="serve a live page of the line at http://HOST:PORT/ (host defaults to 127.0.0.1: only this "
                          "machine; give 0.0.0.0:PORT to let other screens on the network watch)")
    web.add_argument("--serve-fps", type=float, default=10.0, metavar="FPS", help="most frames per second sent to each browser (default 10)")
    web.add_argument("--serve-gallery", type=int, default=12, metavar="N", help="how many recent NG frames the page keeps (default 12)")
    web.add_argument("--serve-token", metavar="TOKEN", help="token that unlocks the page's controls (reset counters, product "
                                           "changeover of a multi-class model); without it "
                                           "the page is read-only")
    mq = p.add_argument_group("MQTT to the line (needs: pip install 'edgead[mqtt]')")
    mq.add_argument("--mqtt", metavar="HOST:PORT", help="publish every decision and stream event to this broker")
    mq.add_argument("--topic", default="edgead", metavar="PREFIX", help="topic prefix: PREFIX/decision, PREFIX/event, PREFIX/status, "
                                                     "PREFIX/summary (default: edgead)")
    mq.add_argument("--mqtt-qos", type=int, choices=[0, 1, 2], default=1, help="QoS of decisions and events (default 1)")
    mq.add_argument("--mqtt-no-retain-status", action="store_true",
                    help="do not retain PREFIX/status (online/offline) on the broker")
    mq.add_argument("--mqtt-queue", type=int, default=1000, metavar="N",
                    help="messages held while the broker is away; older ones are dropped and counted (default 1000)")
    mq.add_argument("--mqtt-client-id", default="", metavar="ID", help="MQTT client id (default: edgead-<pid>)")
    mq.add_argument("--mqtt-accept-class", action="store_true",
                    help="product changeover: take the deciding class of a multi-class model from PREFIX/cmd/class "
                         "(payload: the class name); without it the stream ignores commands")
    mq.add_argument("--mqtt-user", metavar="NAME", help="broker user name (password from the environment variable MQTT_PASSWORD)")


def model_info(model: Any, source: Any = None) -> dict[str, Any]:
    """What the page and the status topic show about the model, read generically from its sidecar."""
    sc = getattr(model, "sidecar", None)
    path = getattr(model, "path", None)
    prov = getattr(sc, "provenance", None) or {}
    cal = prov.get("calibration") if isinstance(prov, dict) else None
    thr = getattr(getattr(sc, "thresholds", None), "image", getattr(model, "threshold", None))
    return {
        "model": (getattr(sc, "model_name", "") or (path.name if path is not None else "")) if sc else str(path or ""),
        "model_file": path.name if path is not None else "",
        "threshold": None if thr is None else float(thr),
        "pixel_threshold": float(getattr(getattr(sc, "thresholds", None), "pixel", 0.1) or 0.1),
        "threshold_method": getattr(getattr(sc, "thresholds", None), "method", None),
        "calibration_date": cal.get("date") if isinstance(cal, dict) else None,
        "provider": getattr(model, "provider", ""),
        "source": getattr(source, "name", ""),
    }


def build_observers(args: argparse.Namespace, model: Any, source: Any) -> list[Observer]:
    """Observers asked for on the command line. Raises ValueError (one line, what to do) on bad flags or a
    missing extra; the caller exits 2."""
    info = model_info(model, source)
    observers: list[Observer] = []
    if args.serve:
        host, port = parse_host_port(args.serve, "--serve")
        try:
            from .web import WebView
        except ImportError as e:
            raise ValueError(f"--serve needs the web extra ({e.name} missing): pip install 'edgead[serve]'") from e
        if args.serve_fps <= 0 or args.serve_gallery < 1:
            raise ValueError("--serve-fps must be > 0 and --serve-gallery >= 1")
        observers.append(WebView(host, port, info, max_fps=args.serve_fps, gallery=args.serve_gallery,
                                 token=args.serve_token))
    if args.mqtt:
        host, port = parse_host_port(args.mqtt, "--mqtt", default_host="127.0.0.1")
        try:
            from .mqtt import MqttPublisher
        except ImportError as e:
            raise ValueError(f"--mqtt needs the MQTT extra ({e.name} missing): pip install 'edgead[mqtt]'") from e
        if args.mqtt_queue < 1:
            raise ValueError("--mqtt-queue must be >= 1")
        import os

        try:
            observers.append(MqttPublisher(host, port, args.topic, qos=args.mqtt_qos,
                                           retain_status=not args.mqtt_no_retain_status, queue_size=args.mqtt_queue,
                                           client_id=args.mqtt_client_id, username=args.mqtt_user,
                                           password=os.environ.get("MQTT_PASSWORD"), info=info,
                                           accept_class=args.mqtt_accept_class))
        except ValueError:
            for o in observers:
                o.close()
            raise
    return observers
