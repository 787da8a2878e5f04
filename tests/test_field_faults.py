"""Field faults with real parts: a network camera that drops off the network and comes back, a disk that fills up."""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from runtime.model import Model
from runtime.sources import DemoSource, ReconnectingSource, Source, SourceError, open_source
from runtime.stream import Stream, main

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_camera(port: int) -> subprocess.Popen:
    """The MJPEG-over-HTTP camera (tests/mjpeg_server.py) as its own process; returns once it serves."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.mjpeg_server", "--port", str(port), "--fps", "25"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    assert "serving" in line, line
    return proc


def _wait(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class _Lines(io.StringIO):
    """A sink whose JSON lines can be read while the stream writes (single writer: the scoring loop)."""

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.getvalue().splitlines()]


def test_network_camera_lost_and_back(onnx_model, caplog):
    port = _free_port()
    url = f"http://127.0.0.1:{port}/stream.mjpg"
    camera = _start_camera(port)
    restarted = None
    caplog.set_level(logging.INFO, logger="runtime")
    try:
        source = open_source(rtsp=url)
        source.max_delay = 2.0  # keep the test short; the default caps back-off at 30 s
        sink = _Lines()
        stream = Stream(Model(onnx_model), source, sink=sink)
        result = {}
        runner = threading.Thread(target=lambda: result.update(summary=stream.run()), daemon=True)
        runner.start()

        def scored() -> int:
            return sum("frame_id" in r for r in sink.records())

        _wait(lambda: scored() >= 10, 30, "frames from the camera")
        camera.kill()  # the camera drops off the network
        camera.wait()
        _wait(lambda: any(r.get("event") == "source_lost" for r in sink.records()), 15, "the source_lost event")
        n_lost = scored()
        time.sleep(3.0)  # a real outage: several back-off attempts fail (connection refused)
        assert runner.is_alive(), "the stream ended on its own during the outage"
        assert scored() == n_lost
        restarted = _start_camera(port)
        _wait(lambda: scored() >= n_lost + 10, 30, "frames after the camera came back")
        stream.stop()
        runner.join(10)
        assert not runner.is_alive()
    finally:
        for p in (camera, restarted):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    summary = result["summary"]
    recs = sink.records()
    events = [r for r in recs if "event" in r]
    assert [e["event"] for e in events] == ["source_lost", "source_back"]
    assert events[1]["outage_s"] >= 3.0 and events[1]["attempts"] >= 2
    # frames before the loss, the two events, frames after the return, in that order
    kinds = ["event" if "event" in r else "frame" for r in recs]
    assert kinds.index("event") > 0 and kinds[-1] == "frame"
    assert summary.error is None and summary.stopped_by == "end of stream"
    assert summary.source_outages == 1
    assert summary.source_outage_seconds == pytest.approx(events[1]["outage_s"], abs=0.01)
    assert summary.frames_scored == len(recs) - 2
    lost_logs = [r for r in caplog.records if "source lost" in r.getMessage()]
    assert len(lost_logs) == 1 and lost_logs[0].levelno == logging.WARNING  # logged once, not per attempt
    assert sum("source back after" in r.getMessage() for r in caplog.records) == 1


def test_stream_stops_promptly_while_source_is_down(onnx_model):
    port = _free_port()
    camera = _start_camera(port)
    try:
        source = open_source(rtsp=f"http://127.0.0.1:{port}/stream.mjpg")
        stream = Stream(Model(onnx_model), source, sink=io.StringIO())
        result = {}
        runner = threading.Thread(target=lambda: result.update(summary=stream.run()), daemon=True)
        runner.start()
        time.sleep(1.0)
    finally:
        camera.kill()
        camera.wait()
    time.sleep(2.0)  # now in back-off (up to 30 s between attempts by default)
    t0 = time.monotonic()
    stream.stop()  # what SIGTERM does
    runner.join(10)
    assert not runner.is_alive() and time.monotonic() - t0 < 3
    s = result["summary"]
    assert s.source_outages == 1 and s.source_outage_seconds >= 1.5  # the ongoing outage is counted


# ---------------------------------------------------------------- disk full

@pytest.fixture()
def small_fs(tmp_path):
    """A 2 MiB tmpfs, mounted for this test (needs root)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("disk-full test needs root to mount a small tmpfs (run the suite as root, e.g. in CI's container)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the disk-full test needs CAP_SYS_ADMIN")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(folder: Path) -> Path:
    """Fill the filesystem of ``folder`` to the last byte (unbuffered: nothing left to flush on close)."""
    filler = folder / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for chunk in (1 << 16, 1 << 12, 1):
            while True:
                try:
                    os.write(fd, b"\0" * chunk)
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


def test_disk_full_scoring_goes_on_and_recovers(onnx_model, small_fs, caplog):
    from runtime.savers import JsonlWriter
    from runtime.sources import DemoSource

    model = Model(onnx_model)
    model.threshold = -1e9  # every frame NG: every frame writes an image and a line
    ng_dir = small_fs / "ng"
    ng_dir.mkdir()
    sink = JsonlWriter(small_fs / "frames.jsonl")
    filler = _fill(small_fs)
    caplog.set_level(logging.INFO, logger="runtime")
    stream = Stream(model, DemoSource(n=None, fps=40, size=96), sink=sink, save_ng=ng_dir)
    result = {}
    runner = threading.Thread(target=lambda: result.update(summary=stream.run()), daemon=True)
    runner.start()
    _wait(lambda: stream.save_ng.unsaved >= 15 and sink.unsaved >= 15, 60, "failed writes on the full disk")
    assert runner.is_alive()
    filler.unlink()  # space returns
    _wait(lambda: stream.save_ng.saved.count >= 10 and sink.size > 0, 60, "writes after space returned")
    stream.stop()
    runner.join(10)
    sink.close()
    s = result["summary"]
    assert s.error is None and s.frames_scored == s.ng_count >= 25  # 15 failed + 10 saved at least
    assert s.ng_unsaved >= 15 and s.jsonl_unsaved >= 15
    assert s.ng_saved_count + s.ng_unsaved == s.ng_count  # every NG frame either saved or counted
    assert len(list(ng_dir.glob("*.jpg"))) == s.ng_saved_count
    assert not [p for p in small_fs.rglob("*") if p.name.endswith(".tmp")]  # no partial files
    lines = (small_fs / "frames.jsonl").read_text().splitlines()  # every line whole
    recs = [json.loads(line) for line in lines]
    assert len(recs) == s.frames_scored - s.jsonl_unsaved
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "not written" in r.getMessage()]
    assert len(warnings) == 2, warnings  # one per kind (JSONL, NG image), not one per frame
    assert any("ENOSPC" in w and "jsonl_unsaved" in w for w in warnings)
    assert any("ENOSPC" in w and "ng_unsaved" in w for w in warnings)
    assert sum("writing again" in r.getMessage() for r in caplog.records) == 2


def test_cli_summary_and_jsonl_on_full_disk(onnx_model, small_fs, tmp_path):
    """The CLI on a full disk: exit 0, summary written elsewhere counts the lost lines, no partial files."""
    _fill(small_fs)
    out = small_fs / "frames.jsonl"
    summary_path = tmp_path / "summary.json"
    rc = main(["--demo", "--demo-frames", "20", "--policy", "block", "--model", str(onnx_model), "--headless",
               "--jsonl", str(out), "--save-ng", str(small_fs / "ng"), "--summary", str(summary_path)])
    assert rc == 0
    s = json.loads(summary_path.read_text())
    assert s["frames_scored"] == 20 and s["jsonl_unsaved"] == 20 - len(out.read_text().splitlines())
    assert s["ng_unsaved"] + s["ng_saved_count"] == s["ng_count"]
    assert not [p for p in small_fs.rglob("*") if p.name.endswith(".tmp")]
    rc = main(["--demo", "--demo-frames", "5", "--model", str(onnx_model), "--headless", "-q",
               "--summary", str(small_fs / "summary.json")])
    assert rc == 0 and not (small_fs / "summary.json").exists()  # not written, logged, no partial file


class _Dropping(Source):
    """A live inner source: ``n`` demo frames (None: endless), then it ends (the camera dropped off)."""

    live = True

    def __init__(self, n: int | None):
        self.n, self.name = n, "dropping"

    def frames(self) -> Iterator[np.ndarray]:
        yield from DemoSource(n=self.n, fps=30, size=96).frames()


class _Events:
    name = "events"

    def __init__(self):
        self.events: list[dict] = []

    def on_frame(self, record, frame_bgr, anomaly_map) -> None:
        pass

    def on_event(self, record: dict) -> None:
        self.events.append(record)

    def close(self) -> dict:
        return {}


def test_one_network_outage_is_one_lost_and_one_back_message(onnx_model):
    """A source that reports its own outages (ReconnectingSource) is not also watched for silence:
    the observers get exactly one 'lost' and one 'back' message per outage, not a duplicate pair."""
    opens = []

    def opener() -> Source:
        opens.append(time.monotonic())
        if len(opens) == 2:  # the first reconnect attempt fails: the outage lasts > 1 s
            raise SourceError("connection refused")
        return _Dropping(20 if len(opens) == 1 else None)

    source = ReconnectingSource(opener, "net-camera", first_delay=0.6, max_delay=1.0)
    watcher = _Events()
    stream = Stream(Model(onnx_model), source, observers=[watcher], outage_after=0.3)
    result = {}
    runner = threading.Thread(target=lambda: result.update(summary=stream.run()), daemon=True)
    runner.start()
    _wait(lambda: len(opens) >= 3 and any(e["event"] == "source_back" for e in watcher.events), 30, "the reconnect")
    time.sleep(1.0)  # frames flow again; a late duplicate 'recovered' would arrive now
    stream.stop()
    runner.join(10)
    assert not runner.is_alive()
    names = [e["event"] for e in watcher.events if e["event"] not in ("stream_started", "stream_stopped")]
    assert names == ["source_lost", "source_back"], names
    assert result["summary"].frames_scored >= 20
