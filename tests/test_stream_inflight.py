"""Batches in flight (``Stream(inflight=N)``, the ``--server`` default): results in frame order, none lost or
duplicated, also when the server goes away and comes back. A scripted stand-in for a remote engine (answers
in a random order, refuses while "down"); the real Triton server runs these paths in tests/test_triton.py."""
from __future__ import annotations

import io
import json
import random
import threading
import time

import numpy as np
import pytest

from runtime.backends.base import ServerUnavailable
from runtime.model import Prediction
from runtime.sources import Source
from runtime.stream import Stream


class FramesSource(Source):
    def __init__(self, n: int, live: bool = False, period: float = 0.0):
        self.n, self.live, self.period, self.name = n, live, period, "frames"

    def frames(self):
        for i in range(self.n):
            if self.period:
                time.sleep(self.period)
            yield np.full((4, 4, 3), i % 256, np.uint8)  # the frame's id is its pixel value


class _Backend:
    name = "triton"  # a remote engine: the stream keeps batches in flight by default

    def __init__(self, owner: "RemoteStandIn"):
        self.owner = owner

    def wait_ready(self, attempt: int, base: float = 0.5, max_delay: float = 30.0) -> bool:
        time.sleep(0.01)
        return not self.owner.down.is_set()


class RemoteStandIn:
    """Answers after a random delay (so later requests often finish first); refuses every call while ``down``."""

    threshold = 1000.0

    def __init__(self, down_between: tuple[int, int] | None = None, seed: int = 0):
        self.backend, self.down = _Backend(self), threading.Event()
        self.rng, self.lock, self.calls, self.down_between = random.Random(seed), threading.Lock(), 0, down_between
        self.max_concurrent, self._running, self.asked = 0, 0, []

    def prepare(self, frames):
        return np.stack(frames)

    def infer(self, batch, outputs=None):
        self.asked.append(outputs)
        with self.lock:
            self.calls += 1
            if self.down_between and self.calls == self.down_between[0]:
                self.down.set()
                threading.Timer(0.15, self.down.clear).start()  # the server is back 0.15 s later
            self._running += 1
            self.max_concurrent = max(self.max_concurrent, self._running)
            delay = self.rng.uniform(0.0, 0.02)
        try:
            time.sleep(delay)
            if self.down.is_set():
                raise ServerUnavailable("stand-in server unreachable")
            v = batch[:, 0, 0, 0].astype(np.float32)
            out = {"image_score": v, "anomaly_map": np.zeros((len(batch), 1, 4, 4), np.float32)}
            return {k: a for k, a in out.items() if outputs is None or k in outputs}
        finally:
            with self.lock:
                self._running -= 1

    def to_prediction(self, out):
        s = out["image_score"]
        amap = out["anomaly_map"][:, 0] if "anomaly_map" in out else None
        return Prediction(image_score=s, anomaly_map=amap, is_ng=s >= self.threshold, scores={}, raw=out)


def _records(sink: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in sink.getvalue().splitlines()]


@pytest.mark.parametrize("inflight,batch", [(3, 1), (2, 2), (1, 1)])
def test_inflight_keeps_frame_order(inflight, batch):
    model, sink = RemoteStandIn(), io.StringIO()
    stream = Stream(model, FramesSource(60), batch=batch, policy="block", sink=sink, inflight=inflight)
    assert stream.inflight == inflight
    summary = stream.run()
    recs = _records(sink)
    assert summary.error is None and summary.frames_scored == 60 == len(recs) and summary.frames_dropped == 0
    assert [r["frame_id"] for r in recs] == list(range(60))
    assert [r["score"] for r in recs] == [float(i) for i in range(60)]  # each frame's own answer
    assert model.max_concurrent == inflight  # the window was used, and never exceeded
    assert set(map(tuple, model.asked)) == {("image_score",)}  # headless, no overlays: the scores only


def test_overlays_ask_for_the_map(tmp_path):
    model, sink = RemoteStandIn(), io.StringIO()
    summary = Stream(model, FramesSource(5), policy="block", sink=sink, save_ng=tmp_path / "ng").run()
    assert summary.frames_scored == 5 and set(map(tuple, model.asked)) == {("image_score", "anomaly_map")}


def test_remote_default_window_and_local_default():
    assert Stream(RemoteStandIn(), FramesSource(1)).inflight == 2

    class Local(RemoteStandIn):
        pass

    local = Local()
    local.backend.name = "onnxruntime"
    assert Stream(local, FramesSource(1)).inflight == 1


def test_inflight_outage_block_scores_every_frame_once():
    model, sink = RemoteStandIn(down_between=(20, None)), io.StringIO()
    summary = Stream(model, FramesSource(60), policy="block", sink=sink, inflight=3, reconnect_delay=0.01,
                     max_reconnects=30, reconnect_max_delay=0.05).run()
    recs = _records(sink)
    assert summary.error is None and summary.server_reconnects >= 1
    assert [r["frame_id"] for r in recs] == list(range(60)) and summary.frames_dropped == 0
    assert [r["score"] for r in recs] == [float(i) for i in range(60)]


def test_inflight_outage_latest_counts_drops():
    model, sink = RemoteStandIn(down_between=(15, None)), io.StringIO()
    summary = Stream(model, FramesSource(60, live=True, period=0.005), policy="latest", sink=sink, inflight=3,
                     reconnect_delay=0.01, max_reconnects=30, reconnect_max_delay=0.05).run()
    recs = _records(sink)
    ids = [r["frame_id"] for r in recs]
    assert summary.error is None and summary.server_reconnects >= 1 and summary.frames_dropped >= 1
    assert ids == sorted(set(ids)) and all(r["score"] == float(r["frame_id"]) for r in recs)
    assert summary.frames_scored + summary.frames_dropped == summary.frames_captured == 60


def test_cli_refuses_an_empty_window(capsys):
    from runtime.stream import main

    assert main(["--demo", "--model", "absent.onnx", "--inflight", "0", "-q"]) == 2
    assert "error: --inflight 0: give 1 or more" in capsys.readouterr().err
