"""The stream, headless: generated video and image folder, JSON lines, drops, shutdown, parity."""
import io
import json
import time

import cv2
import numpy as np
import pytest

from runtime.model import Model
from runtime.sources import CaptureSource, FolderSource, SourceError, open_source
from runtime.stream import Stream, main
from runtime.synthetic import conveyor_frames


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("vid") / "line.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (160, 120))
    assert w.isOpened()
    frames = []
    for f, _ in conveyor_frames(24, size=96, seed=4, frame_size=(160, 120)):
        w.write(f)
        frames.append(f)
    w.release()
    return path


def _lines(buf):
    return [json.loads(l) for l in buf.getvalue().splitlines()]


def test_video_every_frame_scored_and_matches_predict(onnx_model, video):
    model = Model(onnx_model)
    sink = io.StringIO()
    s = Stream(model, CaptureSource(str(video), "video"), sink=sink)
    summary = s.run()
    recs = _lines(sink)
    assert summary.frames_scored == 24 == len(recs) and summary.frames_dropped == 0
    assert [r["frame_id"] for r in recs] == list(range(24))
    # same frames through Model.predict give the same decisions and scores
    cap = cv2.VideoCapture(str(video))
    decoded = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        decoded.append(f)
    pred = model.predict(decoded)
    assert [r["decision"] == "NG" for r in recs] == list(pred.is_ng)
    np.testing.assert_allclose([r["score"] for r in recs], pred.image_score, rtol=1e-4, atol=1e-4)
    # the named component scores (sidecar role "component") are echoed per frame
    assert set(pred.scores) == {"map_score", "gaussian_score"} and all(set(r["scores"]) == set(pred.scores) for r in recs)
    for k, v in pred.scores.items():
        np.testing.assert_allclose([r["scores"][k] for r in recs], v, rtol=1e-4, atol=1e-4, err_msg=k)


def test_image_folder_with_microbatch(onnx_model, synthetic_root, tmp_path):
    sink = io.StringIO()
    src = FolderSource(synthetic_root / "test" / "good")
    summary = Stream(Model(onnx_model), src, batch=4, sink=sink, save_ng=tmp_path / "ng").run()
    assert summary.frames_scored == 12 == len(_lines(sink))
    assert len(list((tmp_path / "ng").glob("*.jpg"))) == summary.ng_count


class SlowModel:
    """The real model, slowed down: inference slower than the camera."""

    def __init__(self, model, delay):
        self.m, self.delay = model, delay
        self.provider = model.provider

    def prepare(self, frames):
        return self.m.prepare(frames)

    def infer(self, batch):
        time.sleep(self.delay)
        return self.m.infer(batch)

    def to_prediction(self, out):
        return self.m.to_prediction(out)


def test_drops_are_counted_when_model_is_slow(onnx_model):
    from runtime.sources import DemoSource

    sink = io.StringIO()
    src = DemoSource(n=40, fps=200, size=96)  # a 200 fps camera, a 20 fps model
    summary = Stream(SlowModel(Model(onnx_model), 0.05), src, sink=sink).run()
    recs = _lines(sink)
    assert summary.frames_captured == 40
    assert summary.frames_dropped > 10
    assert summary.frames_scored + summary.frames_dropped == 40 == summary.frames_captured
    assert len(recs) == summary.frames_scored
    assert max(r["latency_ms"] for r in recs) < 500  # bounded: no backlog builds up


def test_stop_midway_is_clean(onnx_model):
    from runtime.sources import DemoSource

    sink = io.StringIO()
    s = Stream(Model(onnx_model), DemoSource(n=None, fps=100, size=96), sink=sink)
    import threading

    threading.Timer(0.5, s.stop).start()
    summary = s.run()
    assert summary.error is None and summary.frames_scored > 0
    assert len(_lines(sink)) == summary.frames_scored


def test_cli_headless_demo_and_errors(onnx_model, tmp_path, capsys):
    out = tmp_path / "frames.jsonl"
    rc = main(["--demo", "--demo-frames", "10", "--model", str(onnx_model), "--headless", "--jsonl", str(out),
               "--summary", str(tmp_path / "s.json")])
    assert rc == 0
    assert len(out.read_text().splitlines()) == json.loads((tmp_path / "s.json").read_text())["frames_scored"]
    assert main(["--camera", "57", "--model", str(onnx_model), "--headless"]) == 2
    assert "cannot open camera 57" in capsys.readouterr().err
    assert main(["--video", str(tmp_path / "none.mp4"), "--model", str(onnx_model)]) == 2
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"x")
    assert main(["--demo", "--model", str(bad)]) == 2
    assert "sidecar missing" in capsys.readouterr().err
    with pytest.raises(SourceError, match="exactly one source"):
        open_source(camera=0, demo=True)
