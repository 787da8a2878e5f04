"""A real network camera on loopback: MJPEG over HTTP (multipart/x-mixed-replace), like most IP cameras.

    python -m tests.mjpeg_server --port 8090 --fps 20

Serves generated conveyor frames at ``--fps`` to every client of ``http://127.0.0.1:PORT/stream.mjpg``
until killed. Tests start it as a separate process and kill it to make the camera drop off the network.
Standard library + OpenCV only.
"""
from __future__ import annotations

import argparse
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import cv2

BOUNDARY = "edgeadframe"


def _frames(size: int) -> list[bytes]:
    from runtime.synthetic import conveyor_frames

    return [cv2.imencode(".jpg", f)[1].tobytes() for f, _ in conveyor_frames(16, size=size, seed=3)]


class _Server(socketserver.ThreadingMixIn, HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve(port: int, fps: float, size: int) -> None:
    jpegs = _frames(size)
    period = 1.0 / fps

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet: the test reads the stream's log, not ours
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            i = 0
            next_t = time.perf_counter()
            try:
                while True:
                    jpg = jpegs[i % len(jpegs)]
                    self.wfile.write(f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpg)}\r\n\r\n"
                                     .encode() + jpg + b"\r\n")
                    self.wfile.flush()
                    i += 1
                    next_t += period
                    time.sleep(max(0.0, next_t - time.perf_counter()))
            except (BrokenPipeError, ConnectionResetError):
                return

    server = _Server(("127.0.0.1", port), Handler)
    print(f"serving http://127.0.0.1:{port}/stream.mjpg", flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    while True:
        time.sleep(3600)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--fps", type=float, default=20.0)
    p.add_argument("--size", type=int, default=96)
    a = p.parse_args(argv)
    serve(a.port, a.fps, a.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
