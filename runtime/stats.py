"""Bounded per-frame statistics for streams that run for months.

A stream scores 30 frames a second around the clock; keeping every latency in a list for
the summary's percentiles grows by ~70 bytes a frame (~180 MB a day). These structures
have a fixed size whatever the run length:

- ``LogHistogram``: whole-run quantiles from fixed log-spaced bins (relative error < 1 %).
- ``StreamStats``: latency histogram + running model-time sum + a small recent window
  (for the periodic log line).
- ``LastK``: the last K items of something (NG image paths) plus how many there were.
"""
from __future__ import annotations

import collections
import math
from typing import Generic, Iterable, TypeVar

import numpy as np

T = TypeVar("T")


class LogHistogram:
    """Counts of positive values in geometric bins from ``lo`` to ``hi`` (values outside are clamped).

    Quantiles come back as the geometric centre of the bin holding them, so the relative error
    is at most half a bin: (ratio - 1) / 2, 1 % for the default ratio 1.02. Memory: one int64
    per bin (~930 bins for 0.001 ms .. 100 s), fixed.
    """

    def __init__(self, lo: float = 1e-3, hi: float = 1e5, ratio: float = 1.02):
        if not (0 < lo < hi) or ratio <= 1:
            raise ValueError("LogHistogram needs 0 < lo < hi and ratio > 1")
        self.lo, self.ratio = lo, ratio
        self._log_lo, self._log_ratio = math.log(lo), math.log(ratio)
        self.n_bins = int(math.ceil((math.log(hi) - self._log_lo) / self._log_ratio)) + 1
        self.counts = np.zeros(self.n_bins, np.int64)
        self.count = 0

    def _bin(self, value: float) -> int:
        if not value > self.lo:  # also NaN
            return 0
        return min(self.n_bins - 1, int((math.log(value) - self._log_lo) / self._log_ratio))

    def add(self, value: float) -> None:
        self.counts[self._bin(value)] += 1
        self.count += 1

    def quantiles(self, qs: Iterable[float]) -> list[float]:
        """Values at quantiles ``qs`` (each in [0, 1]); NaN for an empty histogram."""
        qs = list(qs)
        if self.count == 0:
            return [math.nan] * len(qs)
        cum = np.cumsum(self.counts)
        out = []
        for q in qs:
            rank = min(self.count, max(1, int(math.ceil(q * self.count))))  # 1-based rank of the quantile
            b = int(np.searchsorted(cum, rank))
            out.append(math.exp(self._log_lo + (b + 0.5) * self._log_ratio))
        return out


class StreamStats:
    """Latency and model-time statistics of a stream in fixed memory.

    ``add(latency_ms, model_ms)`` per frame; ``percentiles()`` over the whole run (histogram),
    ``recent_percentiles()`` over the last ``window`` frames (exact).
    """

    def __init__(self, window: int = 200):
        self.latency = LogHistogram()
        self.recent: collections.deque[float] = collections.deque(maxlen=window)
        self.frames = 0
        self.model_ms_sum = 0.0

    def add(self, latency_ms: float, model_ms: float) -> None:
        self.latency.add(latency_ms)
        self.recent.append(latency_ms)
        self.frames += 1
        self.model_ms_sum += model_ms

    @property
    def model_ms_mean(self) -> float:
        return self.model_ms_sum / self.frames if self.frames else 0.0

    def percentiles(self, ps: Iterable[float] = (50, 90, 99)) -> list[float]:
        """Whole-run latency percentiles in ms (within 1 %)."""
        return self.latency.quantiles(p / 100 for p in ps)

    def recent_percentiles(self, ps: Iterable[float] = (50, 99)) -> list[float]:
        """Exact percentiles in ms of the last ``window`` frames."""
        if not self.recent:
            return [math.nan for _ in ps]
        return [float(v) for v in np.percentile(np.fromiter(self.recent, float), list(ps))]


class LastK(Generic[T]):
    """The last ``k`` items added and the total count: a log of unbounded length in fixed memory."""

    def __init__(self, k: int = 100):
        self.items: collections.deque[T] = collections.deque(maxlen=k)
        self.count = 0

    def add(self, item: T) -> None:
        self.items.append(item)
        self.count += 1

    def __len__(self) -> int:
        return self.count

    def tolist(self) -> list[T]:
        return list(self.items)
