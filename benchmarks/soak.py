"""Soak: a stream at full rate for a set time; does anything grow (memory, files, threads, latency)?

    nice -n 10 python -m benchmarks.soak --model model.onnx --minutes 10

Streams a generated conveyor (frames made in advance and cycled, so the source allocates
nothing new) through ``runtime.stream.Stream`` with every frame scored ("block" policy) and
per-frame JSON lines written to a file, as in production. Every ``--every`` seconds it samples
RSS, open file descriptors, threads and the latency percentiles of that interval. The result
holds the samples and least-squares slopes after ``--warmup`` seconds; target:
``rss_slope_mb_per_10min`` < 1 (no growth beyond noise) and a flat p99.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import write_result
from runtime.model import Model
from runtime.savers import JsonlWriter
from runtime.sources import Source
from runtime.stream import Stream

log = logging.getLogger("benchmarks.soak")

RSS_TARGET_MB_PER_10MIN = 1.0


class CycledSource(Source):
    """A generated camera: ``pool`` conveyor frames made once, then cycled for ``seconds``."""

    live = False  # every frame scored: the loop runs at the model's full rate

    def __init__(self, seconds: float, pool: int = 64, size: int = 256, frame_size: tuple[int, int] = (320, 240)):
        from runtime.synthetic import conveyor_frames

        self.seconds = seconds
        self.pool = [f for f, _ in conveyor_frames(pool, size=size, seed=7, frame_size=frame_size)]
        self.name = "soak"

    def frames(self):
        end = time.monotonic() + self.seconds
        i = 0
        while time.monotonic() < end:
            yield self.pool[i % len(self.pool)]
            i += 1


class LatencyTap:
    """The stream's JSONL sink, also keeping this interval's latencies for the sampler."""

    def __init__(self, writer: JsonlWriter):
        self.writer = writer
        self.lock = threading.Lock()
        self.latencies: list[float] = []

    def write(self, text: str) -> int:
        for line in text.splitlines():
            rec = json.loads(line)
            if "latency_ms" in rec:
                with self.lock:
                    self.latencies.append(rec["latency_ms"])
        return self.writer.write(text)

    def flush(self) -> None:
        self.writer.flush()

    def take(self) -> list[float]:
        with self.lock:
            out, self.latencies = self.latencies, []
        return out

    @property
    def unsaved(self) -> int:
        return self.writer.unsaved


def process_sample() -> dict:
    """RSS (MB), open file descriptors and threads of this process, from /proc."""
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            status[k] = v.strip()
    return {"rss_mb": round(int(status["VmRSS"].split()[0]) / 1024, 3), "open_fds": len(os.listdir("/proc/self/fd")),
            "threads": int(status["Threads"])}


def slope_per_10min(t: list[float], y: list[float]) -> float | None:
    """Least-squares slope of y over t (seconds), per 10 minutes."""
    if len(t) < 3:
        return None
    return round(float(np.polyfit(np.asarray(t), np.asarray(y, float), 1)[0]) * 600, 4)


def soak(model_path: str, minutes: float, every: float, warmup: float, batch: int) -> dict:
    model = Model(model_path)
    seconds = minutes * 60
    source = CycledSource(seconds)
    tmp = tempfile.TemporaryDirectory(prefix="soak_")
    writer = JsonlWriter(Path(tmp.name) / "frames.jsonl")
    tap = LatencyTap(writer)
    stream = Stream(model, source, batch=batch, policy="block", sink=tap, report_every=60)
    samples: list[dict] = []
    done = threading.Event()
    t0 = time.monotonic()

    def sampler() -> None:
        frames_before = 0
        while not done.wait(every):
            lat = tap.take()
            s = {"t_s": round(time.monotonic() - t0, 1), **process_sample(), "frames": len(lat)}
            if lat:
                p = np.percentile(lat, [50, 90, 99])
                s.update(latency_ms_p50=round(float(p[0]), 3), latency_ms_p90=round(float(p[1]), 3),
                         latency_ms_p99=round(float(p[2]), 3), fps=round(len(lat) / every, 1))
            frames_before += len(lat)
            samples.append(s)
            log.info("t=%5.0fs rss %.2f MB fds %d threads %d fps %s p99 %s ms", s["t_s"], s["rss_mb"], s["open_fds"],
                     s["threads"], s.get("fps"), s.get("latency_ms_p99"))

    samples.append({"t_s": 0.0, **process_sample(), "frames": 0})
    th = threading.Thread(target=sampler, name="soak-sampler", daemon=True)
    th.start()
    summary = stream.run()
    done.set()
    th.join()
    writer.close()
    jsonl_mb = round(writer.size / 2**20, 2)
    tmp.cleanup()

    steady = [s for s in samples if s["t_s"] >= warmup and "latency_ms_p99" in s]
    t = [s["t_s"] for s in steady]
    slopes = {
        "rss_slope_mb_per_10min": slope_per_10min(t, [s["rss_mb"] for s in steady]),
        "open_fds_slope_per_10min": slope_per_10min(t, [s["open_fds"] for s in steady]),
        "threads_slope_per_10min": slope_per_10min(t, [s["threads"] for s in steady]),
        "latency_p99_slope_ms_per_10min": slope_per_10min(t, [s["latency_ms_p99"] for s in steady]),
        "latency_p50_slope_ms_per_10min": slope_per_10min(t, [s["latency_ms_p50"] for s in steady]),
    }
    rss = [s["rss_mb"] for s in steady]
    result = {
        "model": str(model_path), "input": [model.height, model.width], "provider": model.provider,
        "minutes": minutes, "sample_every_s": every, "warmup_s": warmup, "batch": batch,
        "frames_scored": summary.frames_scored, "fps": summary.fps, "jsonl_written_mb": jsonl_mb,
        "summary": {k: v for k, v in summary.__dict__.items() if k != "ng_saved"},
        **slopes,
        "rss_mb_after_warmup": {"first": rss[0], "last": rss[-1], "min": min(rss), "max": max(rss)} if rss else None,
        "target": {"rss_slope_mb_per_10min_below": RSS_TARGET_MB_PER_10MIN,
                   "met": slopes["rss_slope_mb_per_10min"] is not None
                   and slopes["rss_slope_mb_per_10min"] < RSS_TARGET_MB_PER_10MIN},
        "samples": samples,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model.onnx (sidecar next to it)")
    p.add_argument("--minutes", type=float, default=10.0, help="how long to stream (default 10)")
    p.add_argument("--every", type=float, default=10.0, help="seconds between samples (default 10)")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds left out of the slopes (default 60)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--name", default="soak.json", help="result file name in benchmarks/results/")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if a.minutes * 60 < a.warmup + 3 * a.every:
        p.error(f"--minutes {a.minutes}: too short for --warmup {a.warmup} s plus three samples of {a.every} s")
    result = soak(a.model, a.minutes, a.every, a.warmup, a.batch)
    path = write_result(a.name, result)
    log.info("rss slope %s MB / 10 min (target < %s), p99 slope %s ms / 10 min -> %s",
             result["rss_slope_mb_per_10min"], RSS_TARGET_MB_PER_10MIN, result["latency_p99_slope_ms_per_10min"], path)
    return 0 if result["target"]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
