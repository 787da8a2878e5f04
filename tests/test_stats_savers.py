"""Bounded stream statistics and disk-safe writers (no model needed)."""
import logging
import os

import numpy as np
import pytest

from runtime.savers import JsonlWriter
from runtime.stats import LastK, LogHistogram, StreamStats


def test_histogram_quantiles_within_one_percent_in_fixed_memory():
    rng = np.random.default_rng(0)
    h = LogHistogram()
    size = h.counts.nbytes
    values = rng.lognormal(np.log(20), 0.8, 200_000)  # latencies around 20 ms with a long tail
    for v in values:
        h.add(float(v))
    assert h.counts.nbytes == size < 10_000 and h.count == len(values)
    for q, est in zip((0.5, 0.9, 0.99, 0.999), h.quantiles((0.5, 0.9, 0.99, 0.999))):
        exact = np.quantile(values, q)
        assert abs(est / exact - 1) < 0.011, (q, est, exact)


def test_histogram_edges():
    h = LogHistogram()
    assert all(np.isnan(h.quantiles([0.5])))
    for v in (0.0, -1.0, float("nan"), 1e9):  # clamped into the end bins, never an error
        h.add(v)
    lo, hi = h.quantiles([0.0, 1.0])
    assert lo <= 1e-3 * 1.02 and 1e5 / 1.02 <= hi <= 1e5 * 1.05  # reported as the range ends


def test_stream_stats_and_last_k_are_bounded():
    s = StreamStats(window=200)
    for i in range(10_000):
        s.add(10.0 + (i % 7), 4.0)
    assert len(s.recent) == 200 and s.frames == 10_000 and s.model_ms_mean == pytest.approx(4.0)
    p50, p99 = s.recent_percentiles((50, 99))
    assert 10 <= p50 <= 16 and p99 <= 16
    k = LastK(3)
    for i in range(1000):
        k.add(f"ng_{i}.jpg")
    assert len(k) == 1000 and k.tolist() == ["ng_997.jpg", "ng_998.jpg", "ng_999.jpg"]


def test_jsonl_writer_on_a_device_that_is_always_full(caplog):
    """/dev/full fails every write with ENOSPC, like a full disk (no root needed)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("/dev/full missing (not Linux)")
    w = JsonlWriter("/dev/full")
    caplog.set_level(logging.WARNING)
    for i in range(50):
        assert w.write(f'{{"frame_id": {i}}}\n') == 0
    w.close()
    assert w.unsaved == 50 and w.size == 0
    warnings = [r.getMessage() for r in caplog.records if "not written" in r.getMessage()]
    assert len(warnings) == 1 and "ENOSPC" in warnings[0] and "jsonl_unsaved" in warnings[0]


def test_jsonl_writer_writes_whole_lines(tmp_path):
    p = tmp_path / "f.jsonl"
    with JsonlWriter(p) as w:
        w.write('{"a": 1}\n')
        w.write('{"b": 2}\n{"c": 3}\n')
    assert p.read_text().splitlines() == ['{"a": 1}', '{"b": 2}', '{"c": 3}'] and w.unsaved == 0
