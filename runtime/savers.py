"""Disk-safe writers for a stream that must keep scoring when the disk fills up.

A full disk (or a removed USB stick, or a read-only remount) must not stop inspection:
every failed write is counted, warned about once per kind of failure, leaves no partial
file behind, and writing resumes by itself when space returns.

- ``JsonlWriter``: per-frame JSON lines, written with one ``os.write`` per line and cut
  back to the last complete line on failure (the file always ends with a whole line).
- ``NgSaver``: NG overlay images, each JPEG encoded in memory and written atomically.
"""
from __future__ import annotations

import errno as _errno
import logging
import os
from pathlib import Path

import cv2
import numpy as np

from .artifact import ArtifactError, atomic_write_bytes
from .stats import LastK

log = logging.getLogger(__name__)


class FailureLog:
    """Counts failures of one kind of write; one warning per distinct cause, a note when writing resumes."""

    def __init__(self, what: str, counter_name: str):
        self.what, self.counter_name = what, counter_name
        self.failed = 0
        self.failing = False
        self._warned: set[str] = set()
        self._recovered_once = False

    def failure(self, exc: BaseException, n: int = 1) -> None:
        self.failed += n
        self.failing = True
        cause = _cause(exc)
        if cause not in self._warned:
            self._warned.add(cause)
            log.warning("%s not written: %s; scoring goes on, unwritten items are counted in the summary (%s) "
                        "and writing resumes when the cause is fixed (this warning is shown once)",
                        self.what, cause, self.counter_name)

    def success(self) -> None:
        if self.failing:
            self.failing = False
            (log.debug if self._recovered_once else log.info)(
                "%s: writing again (%d items not written so far)", self.what, self.failed)
            self._recovered_once = True


def _cause(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{_errno.errorcode.get(exc.errno, exc.errno)} ({os.strerror(exc.errno)})"
    return f"{type(exc).__name__}: {exc}"


class JsonlWriter:
    """A text sink (``write``/``flush``/``close``) for JSON lines that survives a full disk.

    ``unsaved`` counts lines that could not be written. Unbuffered on purpose: the file on
    disk always ends with a complete line, also after ``kill -9``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o666)
        except OSError as e:
            raise ArtifactError(f"--jsonl {self.path}: cannot create ({e.strerror}); check the folder and its "
                                "permissions") from e
        self.size = 0
        self.errors = FailureLog(f"JSONL {self.path}", "jsonl_unsaved")

    @property
    def unsaved(self) -> int:
        return self.errors.failed

    def write(self, text: str) -> int:
        data = text.encode("utf-8")
        try:
            view, done = memoryview(data), 0
            while done < len(data):
                done += os.write(self.fd, view[done:])
        except OSError as e:
            try:  # a short write left part of a line: cut back to the last complete one
                os.ftruncate(self.fd, self.size)
            except OSError:
                pass
            self.errors.failure(e, max(1, text.count("\n")))
            return 0
        self.size += len(data)
        self.errors.success()
        return len(text)

    def flush(self) -> None:
        pass  # every write went straight to the kernel

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NgSaver:
    """Saves NG overlays as JPEG into a folder; remembers the last ``keep`` paths and counts the rest."""

    def __init__(self, folder: str | os.PathLike, keep: int = 100, quality: int = 90):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ArtifactError(f"--save-ng {self.folder}: cannot create the folder ({e.strerror}); check the path, "
                                "free space and permissions") from e
        self.quality = quality
        self.saved: LastK[str] = LastK(keep)
        self.errors = FailureLog(f"NG image in {self.folder}", "ng_unsaved")

    @property
    def unsaved(self) -> int:
        return self.errors.failed

    def save(self, name: str, image: np.ndarray) -> str | None:
        """Write ``image`` (BGR uint8) as ``folder/name``; the path, or None if it could not be written."""
        path = self.folder / name
        try:
            ok, buf = cv2.imencode(path.suffix or ".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
            if not ok:
                raise ValueError(f"OpenCV could not encode {path.suffix or '.jpg'}")
            atomic_write_bytes(path, buf.tobytes())
        except (OSError, ArtifactError, ValueError, cv2.error) as e:
            self.errors.failure(e)
            return None
        self.errors.success()
        self.saved.add(str(path))
        return str(path)
