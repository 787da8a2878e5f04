"""Helpers of the operator tests (web view, MQTT): free ports, a real Mosquitto broker, a stream subprocess."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"  # git-ignored: screenshots for a person to look at


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        time.sleep(0.05)
    return False


def non_loopback_ipv4() -> str | None:
    """An address of this machine other than 127.x (the route's source address; sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class Broker:
    """Debian's mosquitto on 127.0.0.1:port, stoppable and restartable on the same port."""

    def __init__(self, tmp: Path):
        self.exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        self.port = free_port()
        self.conf = tmp / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.log = tmp / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        assert self.exe
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT)
        if not wait_port("127.0.0.1", self.port, 10):
            self.stop()
            raise RuntimeError(f"mosquitto did not listen on {self.port}: {self.log.read_text()[-500:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


class Subscriber:
    """paho subscriber on PREFIX/#, collecting (topic, payload dict, arrival time, retained); resubscribes on reconnect."""

    def __init__(self, port: int, prefix: str):
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, dict, float, bool]] = []
        self.prefix = prefix
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-sub-{os.getpid()}-{time.time_ns()}")
        self.client.reconnect_delay_set(1, 1)
        self.connected = 0
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()
        end = time.monotonic() + 10
        while not self.connected and time.monotonic() < end:
            time.sleep(0.05)
        assert self.connected, "test subscriber could not connect to mosquitto"

    def _on_connect(self, client, userdata, flags, rc, props=None):
        client.subscribe(f"{self.prefix}/#", qos=1)
        self.connected += 1

    def _on_message(self, client, userdata, msg):
        try:
            payload = json.loads(msg.payload)
        except ValueError:  # a plain-text command (PREFIX/cmd/...) seen on the way to the stream
            payload = msg.payload.decode("utf-8", "replace")
        self.messages.append((msg.topic, payload, time.time(), bool(msg.retain)))

    def of(self, leaf: str) -> list[dict]:
        return [m[1] for m in list(self.messages) if m[0] == f"{self.prefix}/{leaf}"]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextlib.contextmanager
def stream_process(model: Path, tmp: Path, *extra: str, frames: int = 0):
    """``python -m runtime.stream --demo`` in a subprocess; yields (proc, summary path); SIGTERM at the end."""
    summary = tmp / "summary.json"
    log = open(tmp / "stream.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "runtime.stream", "--demo", "--demo-frames", str(frames),
                             "--model", str(model), "--headless", "-q", "--summary", str(summary), *extra],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc, summary
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        log.close()


def stream_log(tmp: Path) -> str:
    p = tmp / "stream.log"
    return p.read_text(errors="replace")[-3000:] if p.exists() else ""
