"""Hostile and odd input, property-based: sidecars and images give a clear error or a correct result, never a crash."""
import copy
import io
import json
import math

import cv2
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis missing: pip install -e '.[dev]'")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from runtime.artifact import (MAX_INPUT_SIDE, ArtifactError, InputSpec, Sidecar, read_sidecar,  # noqa: E402
                              sidecar_path)
from runtime.dataset import MAX_IMAGE_PIXELS, DatasetError, decode_image, read_image  # noqa: E402
from runtime.preprocess import FIT_POLICIES, fit_frame  # noqa: E402

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID = Sidecar(model_file="m.onnx", model_sha256="0" * 64, input=InputSpec(64, 48)).to_dict()


def _paths(d, prefix=()):
    """Every key path of a nested dict (objects and leaves)."""
    for k, v in d.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from _paths(v, prefix + (k,))


PATHS = sorted(_paths(VALID))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8) | st.sampled_from([0, -1, 10**9, 1e308, "dynamic", "NHWC", "BGR", "area", "stretch"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)


def _mutate(d, path, action, value, key):
    parent = d
    for k in path[:-1]:
        parent = parent.get(k) if isinstance(parent, dict) else None
    if not isinstance(parent, dict):  # an earlier mutation removed or replaced the object
        return
    if action == "replace":
        parent[path[-1]] = value
    elif action == "delete":
        parent.pop(path[-1], None)
    elif isinstance(parent.get(path[-1]), dict):
        parent[path[-1]][key] = value  # an extra key inside an object
    else:
        parent[key] = value


def _check_usable(sc: Sidecar) -> None:
    """What the runtime relies on, for a sidecar that was accepted."""
    i = sc.input
    for v in (i.height, i.width):
        assert isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_INPUT_SIDE
    assert i.batch == "dynamic" or (isinstance(i.batch, int) and i.batch >= 1)
    assert i.fit in FIT_POLICIES and i.resize in ("area", "linear", "nearest") and i.color_order in ("BGR", "RGB")
    for v in (sc.thresholds.image, sc.thresholds.pixel, sc.score.map_std, sc.score.gaussian_std,
              *sc.normalization.q_low, *sc.normalization.q_high, *sc.thresholds.per_class.values()):
        assert isinstance(v, (int, float)) and math.isfinite(v)
    assert sc.score.map_std > 0 and sc.score.gaussian_std > 0
    assert all(r in ("required", "component", "raw") for r in sc.roles.values())
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in sc.outputs.items())


@FAST
@given(st.lists(st.tuples(st.sampled_from(PATHS), st.sampled_from(["replace", "delete", "add"]), JSON_VALUES,
                          st.text(min_size=1, max_size=6)), min_size=1, max_size=3))
def test_mutated_sidecar_is_refused_clearly_or_usable(mutations):
    d = copy.deepcopy(VALID)
    for path, action, value, key in mutations:
        _mutate(d, path, action, value, key)
    raw = json.loads(json.dumps(d))  # through JSON as on disk (NaN/Infinity included, as Python writes them)
    try:
        sc = Sidecar.from_dict(raw, source="m.onnx.json")
    except ArtifactError as e:
        msg = str(e)
        assert msg.startswith("m.onnx.json: ") and "\n" not in msg and len(msg) < 600
        return
    _check_usable(sc)


@pytest.mark.parametrize("path,value,match", [
    (("input", "height"), 0, "input.height"),
    (("input", "width"), 10**6, "input.width"),
    (("input", "height"), 64.5, "input.height"),
    (("input", "batch"), True, "input.batch"),
    (("input", "fit"), "zoom", "input.fit"),
    (("input", "std"), [0.2, 0.0, 0.2], "input.std must be positive"),
    (("thresholds", "image"), float("nan"), "thresholds.image must be a finite number"),
    (("thresholds", "image"), float("inf"), "thresholds.image"),
    (("thresholds", "image"), "0.5", "thresholds.image"),
    (("score", "map_std"), 0.0, "score.map_std must be positive"),
    (("normalization", "q_high"), [None], "normalization.q_high"),
    (("thresholds", "per_class"), {"bottle": float("nan")}, "thresholds.per_class"),
    (("roles",), {"anomaly_map": "weird"}, "roles must map"),
    (("format",), 3, "sidecar format 3"),
    (("format",), "1", "sidecar format '1'"),
    (("input",), [64, 64], "'input' must be an object"),
    (("outputs",), {"anomaly_map": 1}, "outputs must map"),
    (("provenance",), [], "provenance must be an object"),
])
def test_each_bad_value_is_named(path, value, match):
    d = copy.deepcopy(VALID)
    _mutate(d, path, "replace", value, "")
    with pytest.raises(ArtifactError, match=match.replace("(", r"\(")):
        Sidecar.from_dict(json.loads(json.dumps(d)), "s.json")


def test_unknown_keys_are_refused(tmp_path):
    for d in ({**VALID, "colour": "red"}, {**VALID, "input": {**VALID["input"], "gamma": 2.2}}):
        with pytest.raises(ArtifactError, match="malformed sidecar.*unknown key"):
            Sidecar.from_dict(d)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200))
def test_sidecar_file_of_garbage(tmp_path_factory, data):
    m = tmp_path_factory.mktemp("garbage") / "m.onnx"
    m.write_bytes(b"graph")
    sidecar_path(m).write_bytes(data)
    with pytest.raises(ArtifactError):
        read_sidecar(m)


@pytest.mark.parametrize("data,match", [(b"[" * 100000, "nested too deeply"),
                                        (b'{"format": 1, "input": ' * 50000, "nested too deeply"),
                                        (b" " * (17 * 2**20), "a sidecar is a few kB")])
def test_sidecar_file_deep_or_huge(tmp_path, data, match):
    m = tmp_path / "m.onnx"
    m.write_bytes(b"graph")
    sidecar_path(m).write_bytes(data)
    with pytest.raises(ArtifactError, match=match):
        read_sidecar(m)


# ---------------------------------------------------------------- images (arrays)

IMAGE_ARRAYS = hnp.arrays(
    dtype=st.sampled_from([np.uint8, np.uint16, np.int8, np.int32, np.float32, np.bool_]),
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=24))


def _valid_frame(a: np.ndarray) -> bool:
    if a.dtype not in (np.uint8, np.uint16) or a.ndim not in (2, 3) or 0 in a.shape[:2]:
        return False
    return a.ndim == 2 or a.shape[2] in (1, 3, 4)


@FAST
@given(IMAGE_ARRAYS, st.sampled_from(FIT_POLICIES), st.sampled_from(["area", "linear", "nearest"]),
       st.integers(1, 40), st.integers(1, 40))
def test_fit_frame_any_array(a, fit, resize, h, w):
    if _valid_frame(a):
        out = fit_frame(a, h, w, resize, fit)
        assert out.shape == (h, w, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    else:
        with pytest.raises(ValueError):
            fit_frame(a, h, w, resize, fit)


@FAST
@given(st.integers(1, 60), st.integers(1, 60), st.integers(0, 255), st.sampled_from([1, 3, 4, None]),
       st.sampled_from(["stretch", "center_crop"]), st.sampled_from(["area", "linear", "nearest"]))
def test_fit_frame_constant_colour_is_exact(h, w, value, channels, fit, resize):
    """Correct output, not just the right shape: a uniform frame stays uniform at the same grey level."""
    shape = (h, w) if channels is None else (h, w, channels)
    out = fit_frame(np.full(shape, value, np.uint8), 17, 23, resize, fit)
    assert (out == value).all()


def test_one_pixel_frame():
    out = fit_frame(np.array([[[10, 20, 30]]], np.uint8), 32, 32, "area", "letterbox")
    assert out.shape == (32, 32, 3) and (out == [10, 20, 30]).all()  # 1x1 is square: no bars


# ---------------------------------------------------------------- images (files)

@FAST
@given(ext=st.sampled_from([".png", ".jpg", ".bmp", ".tiff"]),
       shape=st.sampled_from([(1, 1), (1, 1, 3), (7, 5), (7, 5, 3), (9, 13, 4), (4, 6, 1)]),
       sixteen=st.booleans(), cut=st.none() | st.floats(0.0, 0.999))
def test_image_file_decodes_correctly_or_is_refused(ext, shape, sixteen, cut):
    rng = np.random.default_rng(abs(hash((ext, shape, sixteen))) % 2**32)
    dtype = np.uint16 if sixteen and ext in (".png", ".tiff") else np.uint8
    img = rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)
    ok, buf = cv2.imencode(ext, img)
    assert ok
    data = buf.tobytes()
    out = decode_image(data, "f" + ext)
    assert out.shape == (shape[0], shape[1], 3) and out.dtype == np.uint8
    if ext != ".jpg":  # lossless formats: the exact pixels (16-bit -> top 8 bits, gray -> 3 equal channels)
        ref = (img >> 8).astype(np.uint8) if dtype == np.uint16 else img
        ref = ref[..., :3] if ref.ndim == 3 and ref.shape[2] == 4 else ref
        ref = np.repeat(ref.reshape(shape[0], shape[1], -1), 3 // ref.reshape(shape[0], shape[1], -1).shape[2], 2)
        np.testing.assert_array_equal(out, ref)
    if cut is not None:  # a file cut short while being copied: refused, or (trailing bytes unused) the same image
        try:
            cut_out = decode_image(data[:int(len(data) * cut)], "f" + ext)
        except DatasetError:
            return
        np.testing.assert_array_equal(cut_out, out)


def test_cmyk_jpeg_comes_out_in_the_right_colours(tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="Pillow missing (comes with matplotlib)")
    bgr = np.zeros((32, 48, 3), np.uint8)
    bgr[:16] = (255, 0, 0)  # blue on top
    bgr[16:] = (0, 0, 255)  # red below
    p = tmp_path / "cmyk.jpg"
    Image.fromarray(bgr[..., ::-1]).convert("CMYK").save(p, quality=95)
    out = read_image(p)
    assert out.shape == (32, 48, 3)
    assert np.abs(out[4, 4].astype(int) - [255, 0, 0]).max() < 30
    assert np.abs(out[28, 4].astype(int) - [0, 0, 255]).max() < 30


def _png_header_only(w: int, h: int) -> bytes:
    import struct
    import zlib

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("w,h", [(20000, 20000), (100000, 100000), (2**31 - 1, 2)])
def test_huge_dimensions_refused_before_decoding(w, h):
    assert w * h > MAX_IMAGE_PIXELS
    with pytest.raises(DatasetError, match="downscale it"):
        decode_image(_png_header_only(w, h), "huge.png")


def test_huge_jpeg_header_refused():
    ok, buf = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))
    data = bytearray(buf.tobytes())
    i = 2
    while data[i + 1] not in (0xC0, 0xC2):  # walk the markers to the frame header
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    data[i + 5:i + 9] = (60000).to_bytes(2, "big") + (60000).to_bytes(2, "big")
    with pytest.raises(DatasetError, match="60000x60000"):
        decode_image(bytes(data), "huge.jpg")


def test_odd_files_on_disk(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="empty file"):
        read_image(tmp_path / "zero.png")
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(DatasetError, match="not a readable image"):
        read_image(tmp_path / "text.jpg")
    cv2.imwrite(str(tmp_path / "float.tiff"), np.ones((4, 4, 3), np.float32))
    with pytest.raises(DatasetError, match="dtype float32 not supported"):
        read_image(tmp_path / "float.tiff")


# ---------------------------------------------------------------- the stream skips what it cannot read

def test_stream_skips_unreadable_frames_and_counts_them(onnx_model, synthetic_root, tmp_path, caplog):
    import shutil

    from runtime.model import Model
    from runtime.sources import open_source
    from runtime.stream import Stream

    folder = tmp_path / "line"
    folder.mkdir()
    good = sorted((synthetic_root / "test" / "good").glob("*.png"))[:4]
    for i, p in enumerate(good):
        shutil.copy(p, folder / f"{2 * i:02d}.png")
    (folder / "01.png").write_bytes(good[0].read_bytes()[:300])  # cut short
    (folder / "03.jpg").write_bytes(b"")  # empty
    (folder / "05.png").write_bytes(_png_header_only(50000, 50000))  # hostile header
    sink = io.StringIO()
    summary = Stream(Model(onnx_model), open_source(images=str(folder)), sink=sink).run()
    assert summary.error is None and summary.stopped_by == "end of stream"
    assert summary.frames_scored == 4 and summary.frames_skipped == 3
    assert len(sink.getvalue().splitlines()) == 4
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped frame")]
    assert len(skipped) == 3 and "01.png" in skipped[0] and "3 skipped so far" in skipped[-1]


def test_stream_skips_bad_arrays_from_a_custom_source(onnx_model):
    from runtime.model import Model
    from runtime.sources import Source
    from runtime.stream import Stream

    class Odd(Source):
        def frames(self):
            yield np.zeros((64, 64, 3), np.uint8)
            yield np.zeros((0, 64, 3), np.uint8)  # empty
            yield np.zeros((64, 64), np.float32)  # wrong dtype
            yield np.zeros((64, 64), np.uint8)  # grayscale: fine, converted
            yield None

    summary = Stream(Model(onnx_model), Odd()).run()
    assert summary.error is None and summary.frames_scored == 2 and summary.frames_skipped == 3
