"""Run the real ``tritonserver`` on loopback, from the PyPI wheel ``nvidia-pytriton`` 0.7.0, for tests and benchmarks.

The wheel bundles Triton 2.51.0 with the python backend only (no ONNX Runtime or TensorRT backend):
enough to serve the ``--backend python`` repository variant on a CPU. PyTriton's own ``Triton().bind()``
is not used (it fails on Python 3.11.7 here); the binary is driven directly:

    tritonserver --model-repository REPO --backend-directory BE   (LD_LIBRARY_PATH = the wheel's libs)

where ``BE/python/`` holds the python backend and the stub built for this Python. The stub's embedded
interpreter finds its virtual environment through ``PATH``, as PyTriton does. That environment is a small
one of its own: the stub (pybind11, numpy 1 ABI) returns empty output tensors with numpy 2 (seen here:
``binary_data_size 0``), so it holds numpy<2 and reaches this environment's onnxruntime through a .pth file.
Production serving uses NVIDIA's container instead (docs/scaling_out.md).
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

WHEEL = "nvidia-pytriton==0.7.0"
WHEEL_GLOB = "nvidia_pytriton-0.7.0-*.whl"
CACHE = Path(os.environ.get("EDGEAD_TRITON_CACHE", Path(__file__).resolve().parents[1] / ".cache" / "triton"))


class TritonUnavailable(RuntimeError):
    """The local tritonserver cannot be fetched or started here; the message says why."""


def server_dist(cache: Path = CACHE, download: bool = True) -> Path:
    """Folder with ``pytriton/tritonserver`` and ``nvidia_pytriton.libs`` extracted from the wheel.

    The wheel is looked for in ``cache/wheels`` and, if missing, fetched there with ``pip download``.
    """
    root = cache / "pytriton-0.7.0"
    if (root / "pytriton" / "tritonserver" / "bin" / "tritonserver").is_file():
        return root
    wheels = sorted((cache / "wheels").glob(WHEEL_GLOB))
    if not wheels and download:
        (cache / "wheels").mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d",
                            str(cache / "wheels")], capture_output=True, text=True)
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise TritonUnavailable(f"cannot fetch the {WHEEL} wheel with pip ({tail}); put it in {cache / 'wheels'}")
        wheels = sorted((cache / "wheels").glob(WHEEL_GLOB))
    if not wheels:
        raise TritonUnavailable(f"no {WHEEL} wheel in {cache / 'wheels'}; `pip download --no-deps {WHEEL} -d` there")
    tmp = cache / ".extract.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheels[-1]) as z:
        for info in z.infolist():
            if info.filename.startswith(("pytriton/tritonserver/", "nvidia_pytriton.libs/")):
                path = z.extract(info, tmp)
                if info.external_attr >> 16 & 0o111 or "/bin/" in info.filename or info.filename.endswith("_stub"):
                    os.chmod(path, 0o755)
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def backend_dir(dist: Path) -> Path:
    """``BE`` for --backend-directory: ``BE/python/`` with the backend and the stub for this Python."""
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = dist / "pytriton" / "tritonserver" / "python_backend_stubs" / ver / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonUnavailable(f"the {WHEEL} wheel has no python backend stub for Python {ver}")
    be = dist / f"backends-py{ver}"
    py = be / "python"
    if not (py / "triton_python_backend_stub").is_file():
        py.mkdir(parents=True, exist_ok=True)
        src = dist / "pytriton" / "tritonserver" / "backends" / "python"
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(src / name, py / name)
        shutil.copy2(stub, py / "triton_python_backend_stub")
        os.chmod(py / "triton_python_backend_stub", 0o755)
    libs = dist / "nvidia_pytriton.libs"
    try:
        r = subprocess.run(["ldd", str(py / "triton_python_backend_stub")], capture_output=True, text=True,
                           env={**os.environ, "LD_LIBRARY_PATH": str(libs)})
    except OSError:  # no ldd: let the server say what is missing
        return be
    missing = [line.split()[0] for line in r.stdout.splitlines() if "not found" in line]
    if missing:
        raise TritonUnavailable(f"the python backend stub needs {', '.join(missing)} (Debian/Ubuntu: "
                                f"apt-get install libpython{ver})")
    return be


def stub_env(cache: Path = CACHE) -> Path:
    """A venv for the python-backend stub: numpy<2 first, then this interpreter's site-packages (.pth)."""
    import site
    import sysconfig

    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    env = cache / f"stub-env-py{ver}"
    if (env / ".ready").is_file():
        return env
    shutil.rmtree(env, ignore_errors=True)
    r = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], capture_output=True, text=True)
    if r.returncode != 0:
        raise TritonUnavailable(f"cannot create the stub environment {env}: {r.stderr.strip()[-200:]}")
    target = env / "lib" / f"python{ver}" / "site-packages"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(target), "numpy<2"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise TritonUnavailable(f"cannot install numpy<2 for the python backend stub: {r.stderr.strip()[-200:]}")
    parents = [p for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (target / "zz_edgead_parent_env.pth").write_text("\n".join(dict.fromkeys(parents)) + "\n")
    (env / ".ready").write_text("ok\n")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalTriton:
    """One tritonserver process on 127.0.0.1; ``start()``, ``wait_ready()``, ``kill()``, ``stop()``.

    The ports stay the same across restarts, so clients can reconnect to the same URL.
    """

    def __init__(self, repo: str | Path, log_path: str | Path, http_port: int | None = None,
                 grpc_port: int | None = None, dist: Path | None = None, models: list[str] | None = None,
                 extra_args: list[str] | None = None):
        self.repo, self.log_path = Path(repo), Path(log_path)
        self.dist = dist or server_dist()
        self.be = backend_dir(self.dist)
        self.stub_env = stub_env(self.dist.parent)
        self.http_port, self.grpc_port = http_port or free_port(), grpc_port or free_port()
        self.models, self.extra_args = models, list(extra_args or [])
        self.proc: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> "LocalTriton":
        exe = self.dist / "pytriton" / "tritonserver" / "bin" / "tritonserver"
        env = dict(os.environ)
        libs = str(self.dist / "nvidia_pytriton.libs")
        env["LD_LIBRARY_PATH"] = libs + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
        env["PATH"] = str(self.stub_env / "bin") + ":" + env.get("PATH", "")
        cmd = [str(exe), "--model-repository", str(self.repo), "--backend-directory", str(self.be),
               "--http-address", "127.0.0.1", "--http-port", str(self.http_port),
               "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc_port), "--allow-metrics", "false",
               "--backend-config", f"python,shm-region-prefix-name=edgead_{os.getpid()}_{self.grpc_port}_",
               "--log-verbose", "0", *self.extra_args]
        log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log_file.close()
        return self

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 60.0) -> "LocalTriton":
        """Poll readiness (of ``models`` if given, else of the server) until ready; raise TritonUnavailable with the log's tail if not."""
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if self.proc is not None and self.proc.poll() is not None:
                raise TritonUnavailable(f"tritonserver exited with {self.proc.returncode}:\n{self.log_tail()}")
            paths = [f"/v2/models/{m}/ready" for m in self.models] if self.models else ["/v2/health/ready"]
            try:
                if all(urllib.request.urlopen(self.http_url + p, timeout=1).status == 200 for p in paths):
                    return self
            except OSError:  # refused while starting, or 400 (urllib.error.HTTPError) until the models load
                pass
            time.sleep(0.1)
        raise TritonUnavailable(f"tritonserver not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the server (and its python-backend stubs): what a crash looks like to clients."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> "LocalTriton":
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()
