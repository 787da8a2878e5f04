"""The native (C++) runtime against the Python runtime, on the same artifact: real builds, real models.

Builds the CMake project into build/native (incremental), then checks: golden preprocessing vectors
(byte-identical), score / map / decision parity over odd-sized, gray, BGRA and 16-bit images for every
fit policy, the refusals (exit code 2 and one line), the stream's JSON lines and its Ctrl-C behaviour.
Skips (with the reason) only when the C++ toolchain or ONNX Runtime for C++ is absent: `make native`
installs / fetches them, and `make test` runs `make native` first, so CI never skips.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.artifact import read_sidecar, sidecar_path, write_sidecar
from runtime.dataset import read_image
from runtime.model import Model
from runtime.synthetic import conveyor_frames

from .native_golden import write_golden

ROOT = Path(__file__).resolve().parents[1]
BUILD = Path(os.environ.get("EDGEAD_NATIVE_BUILD", ROOT / "build" / "native"))
ORT_ROOT = Path(os.environ.get("ONNXRUNTIME_ROOT", ROOT / ".cache" / "onnxruntime"))
BOTTLE = ROOT.parent / "shared" / "data" / "mvtec_ad" / "bottle" / "test"


def _missing_toolchain() -> str | None:
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    for header, pkg in (("/usr/include/opencv4/opencv2/core.hpp", "libopencv-dev"),
                        ("/usr/include/nlohmann/json.hpp", "nlohmann-json3-dev"),
                        ("/usr/include/gtest/gtest.h", "libgtest-dev"), ("libavformat/avformat.h", "libavformat-dev")):
        found = Path(header).is_file() or any(Path("/usr/include").glob(f"*/{header}"))  # multiarch folders too
        if not found and not (BUILD / "CMakeCache.txt").is_file():
            return f"{header} not found ({pkg})"
    if not (ORT_ROOT / "include" / "onnxruntime_cxx_api.h").is_file() and not (BUILD / "CMakeCache.txt").is_file():
        return f"ONNX Runtime for C++ not at {ORT_ROOT} (native/fetch_onnxruntime.sh)"
    return None


@pytest.fixture(scope="session")
def native() -> Path:
    """Folder holding edgead_stream, edgead_bench and edgead_tests, freshly built."""
    why = _missing_toolchain()
    if why:
        pytest.skip(f"native toolchain absent: {why}; run `make native` (installs the Debian packages, fetches ONNX Runtime)")
    if not (BUILD / "CMakeCache.txt").is_file():
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(BUILD), f"-DONNXRUNTIME_ROOT={ORT_ROOT}"], check=True,
                       capture_output=True, text=True)
    r = subprocess.run(["cmake", "--build", str(BUILD), "-j2"], capture_output=True, text=True)
    assert r.returncode == 0, f"native build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return BUILD


def _run(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, **kw)


def test_ctest_unit_tests_pass(native):
    r = _run(["ctest", "--test-dir", native, "--output-on-failure"])
    assert r.returncode == 0, r.stdout[-4000:]
    assert "tests passed" in r.stdout


def test_preprocessing_byte_identical_to_python(native, tmp_path):
    n = write_golden(tmp_path)
    r = _run([native / "edgead_tests", "--gtest_filter=Preprocess.GoldenVectorsFromPython"],
             env={**os.environ, "EDGEAD_GOLDEN_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stdout[-4000:]
    assert f"checked {n} golden cases" in r.stdout  # ran, not skipped


def _odd_images(folder: Path, synthetic_root: Path) -> None:
    """The synthetic test parts, plus odd sizes, gray, BGRA, 16-bit and (when present) a few MVTec bottles."""
    folder.mkdir()
    parts = sorted((synthetic_root / "test").glob("*/*.png"))
    for i, p in enumerate(parts):
        shutil.copy(p, folder / f"a{i:03d}_{p.parent.name}.png")
    img = cv2.imread(str(parts[-1]))
    cv2.imwrite(str(folder / "b_gray_97x61.png"), cv2.cvtColor(cv2.resize(img, (61, 97)), cv2.COLOR_BGR2GRAY))
    bgra = cv2.cvtColor(cv2.resize(img, (203, 131)), cv2.COLOR_BGR2BGRA)
    bgra[..., 3] = 77
    cv2.imwrite(str(folder / "b_bgra_131x203.png"), bgra)
    cv2.imwrite(str(folder / "b_u16_75x150.png"), cv2.resize(img, (150, 75)).astype(np.uint16) * 257 + 3)
    cv2.imwrite(str(folder / "b_tiny_17x23.png"), cv2.resize(img, (23, 17)))
    for p in sorted(BOTTLE.glob("*/000.*"))[:4] if BOTTLE.is_dir() else []:  # MVTec JPEGs, decoded by each side
        shutil.copy(p, folder / f"c_bottle_{p.parent.name}{p.suffix}")


@pytest.mark.parametrize("fit", ["stretch", "letterbox", "center_crop"])
def test_scores_maps_and_decisions_match_python(native, model_copy, synthetic_root, tmp_path, fit):
    sc = read_sidecar(model_copy)
    sc.input.fit = fit
    # a threshold inside the score range, so both OK and NG decisions are compared
    images = tmp_path / "images"
    _odd_images(images, synthetic_root)
    files = sorted(images.iterdir())
    py = Model(model_copy)
    sc.thresholds.image = float(np.median(py.predict([read_image(f) for f in files]).image_score))
    write_sidecar(model_copy, sc)
    py = Model(model_copy)
    pred = py.predict([read_image(f) for f in files])
    maps, jsonl = tmp_path / "maps", tmp_path / "c.jsonl"
    r = _run([native / "edgead_stream", "--images", images, "--model", model_copy, "--jsonl", jsonl,
              "--save-maps", maps])
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [x["frame_id"] for x in recs] == list(range(len(files)))
    np.testing.assert_allclose([x["score"] for x in recs], pred.image_score, rtol=0, atol=1e-5)
    assert [x["decision"] == "NG" for x in recs] == list(pred.is_ng)
    assert 0 < sum(pred.is_ng) < len(files)
    extra = sorted(pred.scores)  # the graph's named component scores (map_score, gaussian_score, ...)
    assert extra
    for k in extra:
        np.testing.assert_allclose([x["scores"][k] for x in recs], pred.scores[k], rtol=0, atol=1e-5)
    assert all(sorted(x["scores"]) == extra for x in recs)
    c_maps = np.stack([np.load(maps / f"map_{i:06d}.npy") for i in range(len(files))])
    assert c_maps.shape == pred.anomaly_map.shape and c_maps.dtype == np.float32
    np.testing.assert_allclose(c_maps, pred.anomaly_map, rtol=0, atol=1e-4)


def test_product_class_threshold_decides_as_in_python(native, model_copy, synthetic_root, tmp_path):
    """--class NAME: a multi-class model's product threshold, the same decisions as runtime.model.Model(class_name=)."""
    images = tmp_path / "images"
    _odd_images(images, synthetic_root)
    files = sorted(images.iterdir())
    scores = Model(model_copy).predict([read_image(f) for f in files]).image_score
    sc = read_sidecar(model_copy)
    sc.thresholds.image = float(scores.max()) + 1.0  # the global threshold: every part OK
    sc.thresholds.per_class = {"mid": float(np.median(scores)), "strict": -1e9}
    write_sidecar(model_copy, sc)
    py = Model(model_copy, class_name="mid").predict([read_image(f) for f in files])
    assert 0 < sum(py.is_ng) < len(files)
    jsonl = tmp_path / "c.jsonl"
    r = _run([native / "edgead_stream", "--images", images, "--model", model_copy, "--jsonl", jsonl, "--class", "mid"])
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [x["decision"] == "NG" for x in recs] == list(py.is_ng)
    assert {x["class"] for x in recs} == {"mid"} and {x["threshold"] for x in recs} == {round(sc.thresholds.per_class["mid"], 6)}
    r = _run([native / "edgead_stream", "--images", images, "--model", model_copy, "--jsonl", jsonl])
    assert r.returncode == 0 and all(json.loads(x)["decision"] == "OK" and "class" not in json.loads(x)
                                     for x in jsonl.read_text().splitlines())
    _one_error_line(_run([native / "edgead_stream", "--images", images, "--model", model_copy, "--class", "tray"]),
                    "no threshold for class 'tray' (calibrated: mid, strict)")


def _one_error_line(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr


def test_refusals_exit_2_with_one_line(native, model_copy, tmp_path, synthetic_root):
    stream = native / "edgead_stream"
    images = synthetic_root / "test" / "good"
    _one_error_line(_run([stream, "--images", images, "--model", tmp_path / "nope.onnx"]), "model file not found")
    _one_error_line(_run([stream, "--camera", "97", "--model", model_copy]), "cannot open camera 97")
    _one_error_line(_run([stream, "--video", tmp_path / "none.avi", "--model", model_copy]), "not found")
    _one_error_line(_run([stream, "--model", model_copy]), "choose exactly one source")

    side = sidecar_path(model_copy)
    good = json.loads(side.read_text())
    for change, needle in ((dict(format=99), "sidecar format 99"), (dict(model_sha256="0" * 64), "does not match"),
                           (dict(input={**good["input"], "layout": "NCHW"}), "layout NCHW"),
                           (dict(input={**good["input"], "fit": "zoom"}), "fit zoom")):
        side.write_text(json.dumps({**good, **change}))
        _one_error_line(_run([stream, "--images", images, "--model", model_copy]), needle)
    side.write_text("{ not json")
    _one_error_line(_run([stream, "--images", images, "--model", model_copy]), "not valid JSON")
    # corrupt model with a sidecar that matches it: refused by the engine, still one line
    side.write_text(json.dumps(good))
    model_copy.write_bytes(b"\x08\x01corrupt" * 100)
    write_sidecar(model_copy, read_sidecar(model_copy, verify_hash=False))
    _one_error_line(_run([stream, "--images", images, "--model", model_copy]), "onnxruntime cannot load it")
    _one_error_line(_run([native / "edgead_bench", "--model", model_copy]), "onnxruntime cannot load it")


def _video(path: Path, n: int) -> Path:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (160, 120))
    assert w.isOpened()
    for f, _ in conveyor_frames(n, size=96, seed=4, frame_size=(160, 120)):
        w.write(f)
    w.release()
    return path


def test_stream_video_one_json_line_per_frame(native, onnx_model, tmp_path):
    video = _video(tmp_path / "line.avi", 24)
    jsonl, summary, ng = tmp_path / "f.jsonl", tmp_path / "s.json", tmp_path / "ng"
    r = _run([native / "edgead_stream", "--video", video, "--model", onnx_model, "--jsonl", jsonl,
              "--summary", summary, "--save-ng", ng])
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [x["frame_id"] for x in recs] == list(range(24))
    for x in recs:
        assert set(x) - {"saved"} == {"timestamp", "frame_id", "score", "scores", "decision", "latency_ms", "model_ms"}
        assert x["decision"] in ("OK", "NG") and np.isfinite(x["score"])
        assert ("saved" in x) == (x["decision"] == "NG")
    s = json.loads(summary.read_text())
    assert s["frames_scored"] == 24 == s["frames_captured"] and s["frames_dropped"] == 0
    assert s["stopped_by"] == "end of stream" and s["error"] is None
    assert s["ng_count"] == sum(x["decision"] == "NG" for x in recs) == len(list(ng.glob("*.jpg")))
    assert s["provider"].startswith("onnxruntime")


def test_sigint_leaves_complete_last_line_and_summary(native, onnx_model, tmp_path):
    video = _video(tmp_path / "long.avi", 1500)
    summary = tmp_path / "s.json"
    p = subprocess.Popen([str(native / "edgead_stream"), "--video", str(video), "--model", str(onnx_model),
                          "--summary", str(summary)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = [p.stdout.readline() for _ in range(5)]
    assert all(line.endswith("\n") for line in first), first
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    lines = "".join(first) + out
    assert lines.endswith("\n")
    recs = [json.loads(line) for line in lines.splitlines()]
    s = json.loads(summary.read_text())
    assert s["stopped_by"] == "Ctrl-C"
    assert 5 <= s["frames_scored"] == len(recs) < 1500
    assert [x["frame_id"] for x in recs] == list(range(len(recs)))
    assert '"stopped_by": "Ctrl-C"' in err  # the summary is also logged


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_stream_workers_and_readers_give_the_same_lines(native, onnx_model, tmp_path):
    """Frames in flight (--workers 2) and either decoder (FFmpeg directly, cv::VideoCapture): same results, same order."""
    video = _video(tmp_path / "line.avi", 30)
    runs = {"w1": [], "w2": ["--workers", "2"], "w3_threads1": ["--workers", "3", "--threads", "1"],
            "opencv": ["--reader", "opencv"]}
    out = {}
    for name, extra in runs.items():
        jsonl = tmp_path / f"{name}.jsonl"
        r = _run([native / "edgead_stream", "--video", video, "--model", onnx_model, "--jsonl", jsonl, *extra])
        assert r.returncode == 0, (name, r.stderr)
        out[name] = _lines(jsonl)
    ref = out.pop("w1")
    assert [x["frame_id"] for x in ref] == list(range(30))
    for name, recs in out.items():
        assert [x["frame_id"] for x in recs] == list(range(30)), name
        for a, b in zip(ref, recs):
            assert (a["score"], a["scores"], a["decision"]) == (b["score"], b["scores"], b["decision"]), name


def test_stream_without_its_opencv_module_still_reads_video(native, onnx_model, tmp_path, synthetic_root):
    """The OpenCV I/O module is loaded only when needed: a video runs without it, a folder says what is missing."""
    alone = tmp_path / "bin" / "edgead_stream"  # copied away from build/native/libedgead_opencv_io.so
    alone.parent.mkdir()
    shutil.copy2(native / "edgead_stream", alone)
    video = _video(tmp_path / "line.avi", 5)
    r = _run([alone, "--video", video, "--model", onnx_model, "-q"])
    assert r.returncode == 0, r.stderr
    r = _run([alone, "--images", synthetic_root / "test" / "good", "--model", onnx_model])
    _one_error_line(r, "libedgead_opencv_io.so")
    assert "make native" in r.stderr
    r = _run([alone, "--video", video, "--model", onnx_model, "--reader", "opencv"])
    _one_error_line(r, "libedgead_opencv_io.so")


def test_bench_writes_json(native, onnx_model, tmp_path):
    out = tmp_path / "bench.json"
    r = _run([native / "edgead_bench", "--model", onnx_model, "--iters", "3", "--batch", "1", "2", "--out", out])
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["frame"] == [1080, 1920, 3] and set(res["batches"]) == {"1", "2"}
    for b in res["batches"].values():
        assert b["end_to_end"]["n"] == 3 and b["end_to_end"]["p50_ms"] > 0 and b["throughput_images_per_s"] > 0
