"""MQTT to the line: every decision and every stream event, published without ever blocking scoring.

    python -m runtime.stream --camera 0 --model model.onnx --mqtt broker:1883 --topic line3/cam1

Topics (PREFIX = --topic):
    PREFIX/decision   one JSON message per scored frame (the frame's JSON line: frame_id, timestamp,
                      score, scores, decision "OK"/"NG", latency_ms, ...)
    PREFIX/event      stream events: stream_started, source_outage, source_recovered, stream_stopped, ...
    PREFIX/status     retained (unless --mqtt-no-retain-status): {"state": "online"|"offline", ...}; the
                      broker publishes "offline" itself (last will) if this process dies
    PREFIX/summary    the end-of-run counters

With ``--mqtt-accept-class`` it also listens (product changeover, ``runtime.changeover``):
    PREFIX/cmd/class  payload: a product class name (or JSON {"class": NAME}; empty or null = the global
                      threshold) of a multi-class model: decides from the next captured frame. Published
                      back on PREFIX/event: class_changed when it takes effect, class_change_refused (with
                      the reason) when the class has no threshold.

The scoring thread only appends to a bounded queue (oldest dropped and counted when full). A
publisher thread hands messages to paho-mqtt while connected; paho's network thread reconnects
with exponential back-off (1 s .. 30 s) when the broker goes away.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt

from .changeover import class_from_json

log = logging.getLogger(__name__)

POLL_S = 0.01  # how often the publisher thread looks for new messages


class MqttPublisher:
    """Stream observer publishing to an MQTT broker (paho-mqtt 2.x)."""

    name = "mqtt"

    def __init__(self, host: str, port: int, prefix: str = "edgead", qos: int = 1, retain_status: bool = True,
                 queue_size: int = 1000, client_id: str = "", username: str | None = None,
                 password: str | None = None, info: dict[str, Any] | None = None,
                 reconnect_min_s: float = 1.0, reconnect_max_s: float = 30.0, accept_class: bool = False):
        if qos not in (0, 1, 2):
            raise ValueError(f"--mqtt-qos {qos}: choose 0, 1 or 2")
        prefix = prefix.strip("/")
        if not prefix or any(c in prefix for c in "#+"):
            raise ValueError(f"--topic {prefix!r}: give a plain topic prefix such as line3/cam1 (no # or +)")
        self.host, self.port, self.prefix, self.qos = host, port, prefix, qos
        self.retain_status = retain_status
        self.info = dict(info or {})
        # appended by the scoring thread without a lock or a wake-up (deque.append is atomic); the publisher
        # thread polls it every POLL_S, so the two threads do not ping-pong for the interpreter on every frame
        self._queue: collections.deque = collections.deque(maxlen=queue_size)
        self._queue_size = queue_size
        self._connected = threading.Event()
        self._closing = threading.Event()
        self.counters = {"enqueued": 0, "published": 0, "delivered": 0, "dropped_queue_full": 0,
                         "dropped_publish_error": 0, "dropped_at_close": 0, "connects": 0, "disconnects": 0}
        self._lock = threading.Lock()  # counters touched from paho's thread too
        self.accept_class = accept_class
        self._classes = None  # runtime.changeover.ClassSwitch, attached by the stream

        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"edgead-{os.getpid()}",
                                  clean_session=True)
        if username:
            self.client.username_pw_set(username, password)
        self.client.max_queued_messages_set(queue_size)  # paho's own queue is bounded too
        self.client.reconnect_delay_set(min_delay=max(1, int(reconnect_min_s)), max_delay=max(1, int(reconnect_max_s)))
        self.client.will_set(self.topic("status"), json.dumps({"state": "offline", "reason": "connection lost",
                                                                **self.info}), qos=1, retain=retain_status)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_message = self._on_message
        self._last_fail_log = 0.0
        try:
            self.client.connect_async(host, port, keepalive=10)
        except (OSError, ValueError) as e:
            raise ValueError(f"--mqtt {host}:{port}: {e}; check the broker address") from e
        self.client.loop_start()  # paho's network thread: connects, reconnects with back-off
        self._thread = threading.Thread(target=self._publish_loop, name="mqtt-publish", daemon=True)
        self._thread.start()
        log.info("MQTT: publishing to %s:%d under %s/ (QoS %d, queue %d)", host, port, self.prefix, qos, queue_size)

    def topic(self, leaf: str) -> str:
        return f"{self.prefix}/{leaf}"

    # -- paho callbacks (paho's network thread) --------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            log.warning("MQTT: broker %s:%d refused the connection: %s", self.host, self.port, reason_code)
            return
        with self._lock:
            self.counters["connects"] += 1
            n = self.counters["connects"]
        log.info("MQTT: connected to %s:%d%s", self.host, self.port, " (reconnected)" if n > 1 else "")
        client.publish(self.topic("status"), json.dumps({"state": "online", "timestamp": round(time.time(), 6),
                                                         **self.info}), qos=1, retain=self.retain_status)
        if self.accept_class:  # clean session: subscribe again on every (re)connect
            client.subscribe(self.topic("cmd/class"), qos=1)
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was and not self._closing.is_set():
            with self._lock:
                self.counters["disconnects"] += 1  # lost the broker (not our own disconnect at close)
            log.warning("MQTT: lost the broker %s:%d (%s); reconnecting with back-off, decisions are queued "
                        "(at most %d, then the oldest are dropped)", self.host, self.port, reason_code,
                        self._queue_size)

    def _on_connect_fail(self, client, userdata) -> None:
        now = time.monotonic()
        if now - self._last_fail_log >= 60:  # say it once a minute, not on every retry
            self._last_fail_log = now
            log.warning("MQTT: cannot reach the broker %s:%d; retrying with back-off (check --mqtt, that the broker "
                        "runs and the network/firewall); scoring goes on", self.host, self.port)

    def _on_message(self, client, userdata, message) -> None:
        """PREFIX/cmd/class: a product changeover request (paho's thread; the switch is thread-safe)."""
        name = None
        try:
            name = parse_class_command(message.payload)
            if self._classes is None:
                raise ValueError("this stream takes no class changes")
            thr = self._classes.request(name, requested_by="mqtt")
            log.info("MQTT: class %s requested (threshold %.4g)", name or "(global)", thr)
        except ValueError as e:
            log.warning("MQTT: class change refused: %s", e)
            self._put("event", {"event": "class_change_refused", "timestamp": round(time.time(), 6),
                                "class": name, "error": str(e)})

    def attach_classes(self, switch) -> None:
        """The stream's product-class switch (used only with accept_class)."""
        self._classes = switch

    def _on_publish(self, client, userdata, mid, reason_code=None, properties=None) -> None:
        with self._lock:
            self.counters["delivered"] += 1

    # -- observer interface (scoring thread): O(1), never waits -----------------------------------
    def _put(self, leaf: str, payload: dict) -> None:
        if len(self._queue) >= self._queue_size:  # full: append() below evicts the oldest
            self.counters["dropped_queue_full"] += 1
        self._queue.append((leaf, payload))
        self.counters["enqueued"] += 1

    def on_frame(self, record: dict, frame_bgr: Any = None, anomaly_map: Any = None) -> None:
        self._put("decision", record)

    def on_event(self, record: dict) -> None:
        self._put("event", record)

    # -- publisher thread ------------------------------------------------------------------------
    def _publish_loop(self) -> None:
        while True:
            if not self._queue or not self._connected.is_set():
                if self._closing.is_set():
                    return  # what is left is counted by close()
                time.sleep(POLL_S)
                continue
            try:
                leaf, payload = self._queue.popleft()
            except IndexError:
                continue
            try:
                body = json.dumps(payload, default=_jsonable)
                info = self.client.publish(self.topic(leaf), body, qos=self.qos)
                rc = info.rc
            except (ValueError, TypeError, RuntimeError) as e:
                log.warning("MQTT: cannot publish %s: %s", leaf, e)
                rc = None
            if rc == mqtt.MQTT_ERR_SUCCESS or (rc == mqtt.MQTT_ERR_NO_CONN and self.qos > 0):
                # QoS>0 without a connection: paho keeps it and sends it after reconnecting
                with self._lock:
                    self.counters["published"] += 1
            else:
                with self._lock:
                    self.counters["dropped_publish_error"] += 1
                if rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                    time.sleep(0.05)  # paho's in-flight queue is full: let it drain

    def close(self, timeout: float = 3.0) -> dict:
        """Flush what the broker accepts within ``timeout``, say offline, stop. Counters for the summary."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._connected.is_set() and self._queue:
            time.sleep(0.02)
        self._closing.set()
        self._thread.join(timeout=2)
        self.counters["dropped_at_close"] += len(self._queue)
        self._queue.clear()
        if self._connected.is_set():
            try:
                self.client.publish(self.topic("summary"), json.dumps(self.summary(), default=_jsonable), qos=1)
                msg = self.client.publish(self.topic("status"), json.dumps(
                    {"state": "offline", "reason": "stream stopped", "timestamp": round(time.time(), 6), **self.info}),
                    qos=1, retain=self.retain_status)
                # its own second at least: a flush that used the whole deadline (busy CPU) must not cost the final status
                msg.wait_for_publish(timeout=max(1.0, deadline - time.monotonic()))
            except (ValueError, RuntimeError) as e:
                log.warning("MQTT: final status not sent: %s", e)
        self.client.disconnect()
        self.client.loop_stop()
        out = self.summary()
        log.info("MQTT: %s", out)
        return out

    def summary(self) -> dict:
        with self._lock:
            c = dict(self.counters)
        c["dropped"] = c["dropped_queue_full"] + c["dropped_publish_error"] + c["dropped_at_close"]
        c.update({"broker": f"{self.host}:{self.port}", "topic_prefix": self.prefix, "qos": self.qos})
        return c


def parse_class_command(payload: bytes) -> str | None:
    """A PREFIX/cmd/class payload -> the class name (None: the global threshold). Plain text or JSON
    {"class": NAME}; ValueError (one line) otherwise."""
    text = bytes(payload).decode("utf-8", "replace").strip()
    if not text.startswith("{"):
        return text or None
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    return class_from_json(body)


def _jsonable(x: Any) -> Any:
    """numpy scalars and arrays in a record -> plain JSON."""
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    return str(x)
