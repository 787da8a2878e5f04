"""Product changeover on a running stream (runtime.changeover): the deciding class of a multi-class model switched
without a restart, from the web view (token) or MQTT (--mqtt-accept-class), effective from the next captured frame."""
from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
from typing import Iterator

import numpy as np
import pytest

from runtime.artifact import read_sidecar, write_sidecar
from runtime.changeover import ClassSwitch
from runtime.model import Model
from runtime.sources import Source
from runtime.stream import Stream

# thresholds far outside any score: every frame decided by "lenient" is OK, by "strict" NG
PER_CLASS = {"lenient": 1e9, "strict": -1e9}


@pytest.fixture()
def multi_class_model(model_copy):
    sc = read_sidecar(model_copy)
    sc.thresholds.per_class = dict(PER_CLASS)
    write_sidecar(model_copy, sc)
    return model_copy


class _Frames(Source):
    """n frames; calls ``at_frame[i]()`` just before yielding frame i (a command arriving mid-stream)."""

    def __init__(self, n: int, at_frame: dict | None = None):
        self.n, self.at_frame = n, at_frame or {}
        rng = np.random.default_rng(0)
        self._frames = [rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for _ in range(4)]

    def frames(self) -> Iterator[np.ndarray]:
        for i in range(self.n):
            if i in self.at_frame:
                self.at_frame[i]()
            yield self._frames[i % 4]


def _records(text: str) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(x) for x in text.splitlines() if x.strip()]
    return [x for x in lines if "event" not in x], [x for x in lines if "event" in x]


def _threshold_for(name: str | None) -> float:
    if name is not None and name not in PER_CLASS:
        raise KeyError(f"no threshold for class {name!r}")
    return 0.5 if name is None else PER_CLASS[name]


def test_switch_refuses_unknown_classes_and_orders_changes_by_frame():
    sw = ClassSwitch(_threshold_for, None, 0.5, list(PER_CLASS))
    with pytest.raises(ValueError, match="no threshold for class 'tray'"):
        sw.request("tray")
    assert sw.current is None and sw.at(5).threshold == 0.5
    assert sw.request("strict") == -1e9 and sw.current == "strict"
    assert sw.at(6).name is None  # not stamped yet: frames already captured keep the old class
    sw.stamp(7)
    assert sw.at(6).name is None and sw.at(7).name == "strict" and sw.at(8).name == "strict"
    sw.request("")  # empty = the global threshold
    sw.stamp(9)
    assert sw.at(9).name is None and sw.at(9).from_frame == 9
    assert ClassSwitch(None, None, 0.5).classes == []
    with pytest.raises(ValueError, match="takes no class changes"):
        ClassSwitch(None, None, 0.5).request("strict")


def test_one_parser_for_changeover_requests():
    from runtime.changeover import class_from_json

    assert class_from_json({"class": "tray"}) == "tray" and class_from_json({"class": None}) is None
    assert class_from_json({"class": ""}) is None
    for bad in ({"klass": "tray"}, {"class": 3}, ["tray"], None):
        with pytest.raises(ValueError, match='send JSON {"class": "NAME"}'):
            class_from_json(bad)
    pytest.importorskip("paho.mqtt.client", reason="MQTT extra not installed: pip install -e '.[mqtt]' (make test does it)")
    from runtime.mqtt import parse_class_command

    assert parse_class_command(b" board ") == "board" and parse_class_command(b"") is None
    assert parse_class_command(b'{"class": "tray"}') == "tray"
    for bad in (b'{"class": 3}', b"{oops"):
        with pytest.raises(ValueError, match='send JSON {"class": "NAME"}'):
            parse_class_command(bad)


def test_changeover_mid_stream_decides_each_frame_by_the_class_it_was_captured_under(multi_class_model):
    model = Model(multi_class_model, class_name="lenient")
    sink = io.StringIO()
    stream: Stream | None = None

    def command(name):
        return lambda: stream.classes.request(name, requested_by="test")

    source = _Frames(30, {10: command("strict"), 20: command("lenient")})
    stream = Stream(model, source, policy="block", sink=sink)
    summary = stream.run()
    recs, events = _records(sink.getvalue())
    assert summary.frames_scored == 30 and [r["frame_id"] for r in recs] == list(range(30))
    assert [r["decision"] for r in recs] == ["OK"] * 10 + ["NG"] * 10 + ["OK"] * 10
    assert [r["class"] for r in recs] == ["lenient"] * 10 + ["strict"] * 10 + ["lenient"] * 10
    assert all(r["threshold"] == PER_CLASS[r["class"]] for r in recs)
    changed = [e for e in events if e["event"] == "class_changed"]
    assert [(e["frame_id"], e["class"], e["previous_class"], e["by"]) for e in changed] == [
        (10, "strict", "lenient", "test"), (20, "lenient", "strict", "test")]
    assert [c["class"] for c in summary.class_changes] == ["strict", "lenient"] and summary.ng_count == 10


def test_unknown_class_is_refused_and_the_line_keeps_deciding(multi_class_model):
    model = Model(multi_class_model, class_name="lenient")
    sink = io.StringIO()
    errors: list[str] = []
    stream: Stream | None = None

    def bad():
        try:
            stream.classes.request("tray")
        except ValueError as e:
            errors.append(str(e))

    stream = Stream(model, _Frames(12, {5: bad}), policy="block", sink=sink)
    summary = stream.run()
    recs, events = _records(sink.getvalue())
    assert len(errors) == 1 and "no threshold for class 'tray'" in errors[0] and "calibration fit" in errors[0]
    assert {r["class"] for r in recs} == {"lenient"} and summary.ng_count == 0 and not summary.class_changes
    assert not [e for e in events if e["event"] == "class_changed"]


def _post_json(url: str, body: dict, token: str | None) -> tuple[int, dict]:
    req = urllib.request.Request(url, method="POST", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_web_view_changes_the_class_only_with_the_token(multi_class_model):
    pytest.importorskip("uvicorn", reason="web extra not installed: pip install -e '.[serve]' (make test does it)")
    from runtime.web import WebView

    from tests.operator_tools import get_json

    model = Model(multi_class_model, class_name="lenient")
    view = WebView("127.0.0.1", 0, {"model": "toy", "threshold": 0.5}, token="s3cret")
    sink = io.StringIO()
    stream: Stream | None = None
    answers: dict = {}

    def operator():  # an operator on the page, while the line runs
        answers["no_token"] = _post_json(view.url + "api/class", {"class": "strict"}, None)
        answers["unknown"] = _post_json(view.url + "api/class", {"class": "tray"}, "s3cret")
        answers["malformed"] = _post_json(view.url + "api/class", {"klass": "strict"}, "s3cret")
        answers["ok"] = _post_json(view.url + "api/class", {"class": "strict"}, "s3cret")
        answers["status"] = get_json(view.url + "api/status")

    try:
        stream = Stream(model, _Frames(16, {8: operator}), policy="block", sink=sink, observers=[view])
        stream.run()
    finally:
        view.close()
    assert answers["no_token"][0] == 401
    assert answers["unknown"][0] == 400 and "no threshold for class 'tray'" in answers["unknown"][1]["error"]
    assert answers["malformed"][0] == 400 and '{"class": "NAME"}' in answers["malformed"][1]["error"]
    assert answers["ok"][0] == 200 and answers["ok"][1]["threshold"] == PER_CLASS["strict"]
    assert answers["status"]["class"] == "strict" and answers["status"]["classes"] == sorted(PER_CLASS)
    recs, _ = _records(sink.getvalue())
    assert [r["class"] for r in recs] == ["lenient"] * 8 + ["strict"] * 8


def test_mqtt_command_switches_the_class_and_refusals_are_published(multi_class_model, tmp_path):
    pytest.importorskip("paho.mqtt.client", reason="MQTT extra not installed: pip install -e '.[mqtt]' (make test does it)")
    import paho.mqtt.client as mqtt

    from runtime.mqtt import MqttPublisher
    from runtime.observers import build_observers
    from runtime.stream import build_parser
    from tests.operator_tools import Broker, Subscriber

    broker = Broker(tmp_path)
    if broker.exe is None:
        pytest.skip("Debian mosquitto not installed: apt-get install -y mosquitto (make test does it as root)")
    broker.start()
    sub = Subscriber(broker.port, "line1/cam")
    plc = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="plc")
    plc.connect("127.0.0.1", broker.port)
    plc.loop_start()
    try:
        model = Model(multi_class_model, class_name="lenient")
        parser = build_parser()
        flags = ["--demo", "--model", str(multi_class_model), "--mqtt", f"127.0.0.1:{broker.port}", "--topic", "line1/cam"]
        (pub,) = build_observers(parser.parse_args(flags + ["--mqtt-accept-class"]), model, None)
        assert isinstance(pub, MqttPublisher) and pub.accept_class
        stream: Stream | None = None

        def send(payload: str, then=lambda: True):
            def go():
                plc.publish("line1/cam/cmd/class", payload, qos=1).wait_for_publish(5)
                end = time.monotonic() + 10  # the command reaches the stream before the next frame is captured
                while time.monotonic() < end and not then():
                    time.sleep(0.01)
            return go

        source = _Frames(20, {
            5: send("tray", lambda: any(e["event"] == "class_change_refused" for e in sub.of("event"))),
            10: send('{"class": "strict"}', lambda: stream.classes.current == "strict")})
        stream = Stream(model, source, policy="block", observers=[pub])
        end = time.monotonic() + 10
        while time.monotonic() < end and not pub.counters["connects"]:
            time.sleep(0.02)
        time.sleep(0.3)  # the subscription is acknowledged
        summary = stream.run()
        end = time.monotonic() + 10
        while time.monotonic() < end and len(sub.of("decision")) < 20:
            time.sleep(0.02)
        decisions = sub.of("decision")
        assert [d["class"] for d in decisions] == ["lenient"] * 10 + ["strict"] * 10
        assert [d["decision"] for d in decisions] == ["OK"] * 10 + ["NG"] * 10
        refused = [e for e in sub.of("event") if e["event"] == "class_change_refused"]
        assert len(refused) == 1 and refused[0]["class"] == "tray" and "no threshold" in refused[0]["error"]
        changed = [e for e in sub.of("event") if e["event"] == "class_changed"]
        assert [(e["frame_id"], e["class"], e["by"]) for e in changed] == [(10, "strict", "mqtt")]
        assert summary.class_changes[0]["by"] == "mqtt"

        # without --mqtt-accept-class the same command changes nothing
        (deaf,) = build_observers(parser.parse_args(flags), Model(multi_class_model, class_name="lenient"), None)
        assert not deaf.accept_class
        end = time.monotonic() + 10
        while time.monotonic() < end and not deaf.counters["connects"]:
            time.sleep(0.02)
        time.sleep(0.3)
        stream = Stream(Model(multi_class_model, class_name="lenient"),
                        _Frames(10, {3: lambda: (send('strict')(), time.sleep(0.5))}), policy="block", observers=[deaf])
        summary = stream.run()
        assert summary.ng_count == 0 and not summary.class_changes and stream.classes.current == "lenient"
    finally:
        plc.loop_stop()
        plc.disconnect()
        sub.close()
        broker.stop()


def test_operator_changes_the_product_on_the_page(multi_class_model, tmp_path):
    """In a real headless chromium: the page shows the deciding class; with the token, the picker switches it."""
    pytest.importorskip("uvicorn", reason="web extra not installed: pip install -e '.[serve]' (make test does it)")
    from tests.operator_tools import free_port, get_json, stream_log, stream_process
    from tests.test_web_view import _chromium, _wait_status

    exe = _chromium()
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with stream_process(multi_class_model, tmp_path, "--serve", f"127.0.0.1:{port}", "--serve-token", "tok",
                        "--class", "lenient") as (proc, _):
        _wait_status(url, tmp_path)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.on("dialog", lambda d: d.accept("tok"))  # the token prompt
                page.goto(url)
                page.wait_for_function("document.getElementById('verdict').textContent === 'OK'", timeout=30000)
                assert page.text_content("#class") == "lenient" and page.is_visible("#changeover")
                assert page.input_value("#classpick") == "lenient"  # the picker starts at the deciding class
                page.select_option("#classpick", "strict")
                page.click("#setclass")
                page.wait_for_function("document.getElementById('class').textContent === 'strict' && "
                                       "document.getElementById('verdict').textContent === 'NG'", timeout=30000)
                assert page.text_content("#threshold").startswith("-1000000000.000")
                st = get_json(url + "api/status")
                assert st["class"] == "strict" and any(e["event"] == "class_changed" for e in st["events"])
            finally:
                browser.close()
    assert proc.returncode == 0, stream_log(tmp_path)


def test_a_changeover_decides_with_the_models_own_comparison():
    """After a changeover the stream decides with runtime.model.is_ng, the comparison Model.to_prediction (and the
    native runtime) makes: in the score's float32. A threshold between two float32 values must not flip a part."""
    from runtime.model import is_ng

    score = np.float32([1.0])
    assert bool(is_ng(score, 1.0 + 1e-9)[0])  # 1 + 1e-9 is 1.0 in float32: NG, as the deployed graph's runtimes say
    assert not bool(is_ng(score, float(np.nextafter(np.float32(1.0), np.float32(2.0))))[0])
