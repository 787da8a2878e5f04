"""Product changeover on a running line: which product class's threshold decides, switched without a restart.

A multi-class model (one artifact for several products, e.g. ``--model uniad``) carries one threshold per
class (``python -m calibration fit ... --class NAME``). When the line changes product, the PLC (MQTT,
``PREFIX/cmd/class`` with ``--mqtt-accept-class``) or an operator (web view, with ``--serve-token``) asks
for the new class. The request is checked at once: a class without a threshold is refused with a one-line
reason, and the line keeps deciding as before. An accepted request takes effect from the next captured
frame: parts already captured (in the buffer or in flight) are decided by the class they were captured
under, never by a threshold meant for the next product.

Thread-safe: requests come from the web server's or the MQTT client's thread, ``stamp`` from the capture
thread, ``at`` from the scoring thread. Standard library only (the runtime needs no torch).
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Any, Callable

_UNSET = object()


def class_from_json(body: Any) -> str | None:
    """A changeover request's JSON ``{"class": NAME}`` (web view, MQTT) -> the class name (None or "" = the global
    threshold); ValueError (one line, what to send) for anything else."""
    name = body.get("class", 0) if isinstance(body, dict) else 0
    if not (name is None or isinstance(name, str)):
        raise ValueError('send JSON {"class": "NAME"} (null for the global threshold)')
    return name or None


@dataclass(frozen=True)
class ClassSetting:
    """The class (None = the global threshold) and threshold that decide frames from ``from_frame`` on."""

    name: str | None
    threshold: float
    from_frame: int
    requested_by: str = "start"


class ClassSwitch:
    """The deciding class of a stream: requested from any thread, effective from the next captured frame."""

    def __init__(self, threshold_for: Callable[[str | None], float] | None, current: str | None, threshold: float,
                 classes: list[str] | None = None):
        self._threshold_for = threshold_for
        self.classes = sorted(classes or [])
        self._lock = threading.Lock()
        self._pending: Any = _UNSET  # (name, threshold, requested_by) until the capture thread stamps it
        self._settings: collections.deque[ClassSetting] = collections.deque([ClassSetting(current, float(threshold), 0)])

    @classmethod
    def for_model(cls, model: Any) -> "ClassSwitch":
        """The switch of a ``runtime.model.Model`` (or anything with ``threshold``: it decides until a changeover;
        without ``threshold_for`` every request is refused)."""
        sc = getattr(model, "sidecar", None)
        per_class = getattr(getattr(sc, "thresholds", None), "per_class", None) or {}
        return cls(getattr(model, "threshold_for", None), getattr(model, "class_name", None),
                   float(getattr(model, "threshold", 0.0)), list(per_class))

    @property
    def current(self) -> str | None:
        """The class the next captured frame will be decided by (a pending request included)."""
        with self._lock:
            if self._pending is not _UNSET:
                return self._pending[0]
            return self._settings[-1].name

    def request(self, name: str | None, requested_by: str = "api") -> float:
        """Ask for ``name`` (None or "" = the global threshold); returns its threshold.

        Raises ValueError (one line, what to do) for a class without a threshold; nothing changes then."""
        name = (name or "").strip() or None
        if self._threshold_for is None:
            raise ValueError("this model takes no class changes (no per-class thresholds)")
        try:
            thr = float(self._threshold_for(name))
        except Exception as e:  # ArtifactError from the sidecar: say it, keep the line as it is
            raise ValueError(str(e)) from None
        with self._lock:
            self._pending = (name, thr, requested_by)
        return thr

    def stamp(self, frame_id: int) -> None:
        """Capture thread, before frame ``frame_id`` is queued: a pending request takes effect from it."""
        if self._pending is _UNSET:  # the common case, without the lock
            return
        with self._lock:
            if self._pending is _UNSET:
                return
            name, thr, by = self._pending
            self._pending = _UNSET
            self._settings.append(ClassSetting(name, thr, int(frame_id), by))

    def at(self, frame_id: int) -> ClassSetting:
        """Scoring thread: the setting that decides frame ``frame_id`` (frames are scored in capture order,
        so settings older than it are forgotten)."""
        with self._lock:
            while len(self._settings) > 1 and self._settings[1].from_frame <= frame_id:
                self._settings.popleft()
            return self._settings[0]
