"""The live web view (--serve): in a real headless chromium, bind policy, control token, slow browsers."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.operator_tools import ARTIFACTS, ROOT, free_port, get_json, non_loopback_ipv4, stream_log, stream_process

pytest.importorskip("starlette", reason="web extra not installed: pip install -e '.[serve]' (make test does it)")
pytest.importorskip("uvicorn", reason="web extra not installed: pip install -e '.[serve]' (make test does it)")

from runtime.observers import parse_host_port  # noqa: E402
from runtime.web import WebView  # noqa: E402

INFO = {"model": "toy", "threshold": 0.5, "pixel_threshold": 0.1, "calibration_date": "2026-01-02T03:04:05+00:00",
        "source": "test"}


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Debian chromium not installed: apt-get install -y chromium chromium-driver (make test does it as root)")
    pytest.importorskip("playwright.sync_api", reason="playwright not installed: pip install playwright (no browser "
                                                     "download needed: the system chromium is used)")
    return exe


def _wait_status(url: str, tmp, timeout: float = 60.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            return get_json(url + "api/status", timeout=2)
        except (OSError, urllib.error.URLError):
            time.sleep(0.2)
    pytest.fail(f"web view did not come up at {url}:\n{stream_log(tmp)}")


def test_page_in_real_browser_during_demo_stream(onnx_model, tmp_path):
    """Page loads, the live image changes, counters increase, an NG reaches the gallery; screenshot saved."""
    exe = _chromium()
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with stream_process(onnx_model, tmp_path, "--serve", f"127.0.0.1:{port}") as (proc, summary_path):
        status = _wait_status(url, tmp_path)
        thr = status["model"]["threshold"]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 860})
                page.goto(url)
                page.wait_for_function("Number(document.getElementById('parts').textContent) > 0", timeout=30000)
                assert page.text_content("#threshold").startswith(f"{thr:.3f}")
                assert page.text_content("#model") == status["model"]["model"]
                page.wait_for_function("document.getElementById('live').naturalWidth > 0", timeout=30000)
                shot1 = page.locator("#live").screenshot()
                parts1 = int(page.text_content("#parts"))
                page.wait_for_selector("#gallery figure.ng-item", timeout=60000)
                time.sleep(1.5)
                shot2 = page.locator("#live").screenshot()
                parts2 = int(page.text_content("#parts"))
                assert shot1 != shot2, "the live image did not change"
                assert parts2 > parts1, "the parts counter did not increase"
                assert page.text_content("#verdict") in ("OK", "NG")
                # the gallery shows NG frames with their scores, each at or above the threshold in use
                # read one figure at once: the gallery re-renders when the next NG part arrives
                fid, caption = page.eval_on_selector(
                    "#gallery figure.ng-item", "f => [Number(f.dataset.frameId), f.querySelector('figcaption').textContent]")
                st = get_json(url + "api/status")
                entry = next((g for g in st["gallery"] if g["frame_id"] == fid), None)
                if entry is not None:  # still among the kept ones
                    assert f"{entry['score']:.3f}" in caption and entry["score"] >= thr
                    assert entry["decision"] == "NG"
                assert st["ng"] >= 1 and 0 < st["ng_rate"] <= 1 and st["fps"] and st["fps"] > 0
                # every gallery image loads (a broken one would stay at naturalWidth 0)
                page.wait_for_function("[...document.querySelectorAll('#gallery img')].every(i => i.complete && "
                                       "i.naturalWidth > 0)", timeout=10000)
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "web_view.png"), full_page=True)
            finally:
                browser.close()
    assert proc.returncode == 0, stream_log(tmp_path)
    summary = json.loads(summary_path.read_text())
    web = summary["observers"]["web"]
    assert web["frames_seen"] == summary["frames_scored"] > 0 and web["frames_encoded"] > 0
    assert web["ng_thumbnails"] >= 1


def test_serve_host_defaults_to_loopback():
    assert parse_host_port("8080", "--serve") == ("127.0.0.1", 8080)
    assert parse_host_port(":8080", "--serve") == ("127.0.0.1", 8080)
    assert parse_host_port("0.0.0.0:81", "--serve") == ("0.0.0.0", 81)
    with pytest.raises(ValueError, match="--serve"):
        parse_host_port("host:http", "--serve")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            s.sendall(b"GET /api/status HTTP/1.0\r\nHost: x\r\n\r\n")
            return s.recv(12).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def test_not_reachable_from_network_unless_asked():
    ip = non_loopback_ipv4()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address to test from")
    local = WebView("127.0.0.1", 0, INFO)
    try:
        assert _reachable("127.0.0.1", local.port)
        assert not _reachable(ip, local.port), f"loopback-bound view answered on {ip}"
    finally:
        local.close()
    public = WebView("0.0.0.0", 0, INFO)
    try:
        assert _reachable(ip, public.port), f"--serve 0.0.0.0:PORT must answer on {ip}"
    finally:
        public.close()


def _post(url: str, token: str | None) -> int:
    req = urllib.request.Request(url, method="POST", data=b"")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _feed(view: WebView, n: int, ng_every: int = 3) -> None:
    frame = np.full((48, 64, 3), 128, np.uint8)
    for i in range(n):
        ng = i % ng_every == 0
        view.on_frame({"frame_id": i, "timestamp": time.time(), "score": 1.0 if ng else 0.1,
                       "decision": "NG" if ng else "OK", "latency_ms": 5.0}, frame, np.zeros((16, 16), np.float32))


def test_read_only_unless_token_given():
    view = WebView("127.0.0.1", 0, INFO)
    try:
        _feed(view, 6)
        assert _post(view.url + "api/reset", None) == 403
        assert view.status()["parts"] == 6 and view.status()["controls"] is False
    finally:
        view.close()
    view = WebView("127.0.0.1", 0, INFO, token="s3cret")
    try:
        _feed(view, 6)
        assert _post(view.url + "api/reset", None) == 401
        assert _post(view.url + "api/reset", "wrong") == 401
        assert view.status()["parts"] == 6
        assert _post(view.url + "api/reset", "s3cret") == 200
        st = get_json(view.url + "api/status")
        assert st["parts"] == 0 and st["ng"] == 0 and st["controls"] is True
        assert st["model"]["calibration_date"] == INFO["calibration_date"]
    finally:
        view.close()


def test_gallery_keeps_the_last_ng_frames_with_scores():
    view = WebView("127.0.0.1", 0, INFO, gallery=3)
    try:
        _feed(view, 30)  # NG at 0, 3, ..., 27
        end = time.monotonic() + 5
        while time.monotonic() < end and [g["frame_id"] for g in view.status()["gallery"]] != [27, 24, 21]:
            time.sleep(0.05)
        st = view.status()
        assert [g["frame_id"] for g in st["gallery"]] == [27, 24, 21]
        assert all(g["score"] == 1.0 for g in st["gallery"])
        with urllib.request.urlopen(view.url + "gallery/27.jpg", timeout=5) as r:
            assert r.headers["Content-Type"] == "image/jpeg" and r.read(2) == b"\xff\xd8"
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(view.url + "gallery/0.jpg", timeout=5)
    finally:
        view.close()


def _mjpeg_request(port: int, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: x\r\n\r\n")
    return s


def _timed_stream(model, view, n: int):
    from runtime.sources import DemoSource
    from runtime.stream import Stream

    src = DemoSource(n=n, fps=30.0, frame_size=(1280, 960))  # large frames: ~100 kB JPEGs fill socket buffers fast
    t0 = time.perf_counter()
    summary = Stream(model, src, policy="block", observers=[view]).run()
    return time.perf_counter() - t0, summary


def test_stalled_and_closed_browsers_never_slow_scoring(onnx_model):
    """Browsers that never read the MJPEG stream or hang up mid-way cost the line no more than one that keeps up:
    every frame is scored, at the pace of a run with a healthy browser measured in the same test."""
    import threading

    from runtime.model import Model

    model = Model(onnx_model)
    n = 60
    # baseline: one browser that reads everything
    view = WebView("127.0.0.1", 0, INFO, max_fps=30)
    reader = _mjpeg_request(view.port)
    got = bytearray()
    threading.Thread(target=lambda: [got.extend(b) for b in iter(lambda: reader.recv(1 << 16), b"")],
                     daemon=True).start()
    wall_ok, base = _timed_stream(model, view, n)
    reader.close()
    assert base.frames_scored == n and got.count(b"--frame") >= 2
    # three browsers that never read, and one that closes its tab mid-stream
    view = WebView("127.0.0.1", 0, INFO, max_fps=30)
    stalled = [_mjpeg_request(view.port, rcvbuf=4096) for _ in range(3)]
    closer = _mjpeg_request(view.port)
    threading.Timer(1.0, closer.close).start()
    wall, summary = _timed_stream(model, view, n)
    for s in stalled:
        s.close()
    assert summary.frames_scored == n and summary.error is None
    assert wall < 1.5 * wall_ok + 1.0, f"{wall:.1f}s with stalled browsers vs {wall_ok:.1f}s with a healthy one"
    web = summary.observers["web"]
    assert web["frames_seen"] == n and web["frames_encoded"] > 0
    assert web["on_frame_ms_mean"] < 5, web  # the scoring thread's cost of the view, measured by the stream


def test_stream_without_the_extra_imports_none_of_it_and_says_what_to_install(onnx_model):
    code = ("import sys; import runtime.stream; "
            "bad=[m for m in sys.modules if m.split('.')[0] in ('starlette','uvicorn','paho')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    code = ("import sys; sys.modules['starlette']=None; sys.modules['paho']=None; from runtime.stream import main; "
            f"sys.exit(main(['--demo','--model',{str(onnx_model)!r},'--headless','--serve','0']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "pip install 'edgead[serve]'" in r.stderr, r.stderr[-800:]
    code = code.replace("'--serve','0'", "'--mqtt','127.0.0.1:1'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "pip install 'edgead[mqtt]'" in r.stderr, r.stderr[-800:]
