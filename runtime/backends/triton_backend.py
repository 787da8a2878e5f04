"""Triton Inference Server as a backend: frames prepared on the camera side, the graph run on the server.

    Model(None, backend="triton", server="grpc://gpu-host:8001", model_name="bottle")

The sidecar comes with the repository (``config.pbtxt`` parameter ``edgead_sidecar``, written by
``python -m export triton``); given a local artifact too, its digest must equal the served one.
Server gone -> ``ServerUnavailable`` (the stream reconnects with back-off); everything else that
cannot work (unknown model, not ready, shape/dtype/digest mismatch) -> ``ArtifactError`` with a fix.
tritonclient is imported here only: the runtime needs it only with ``--server``.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from ..artifact import ArtifactError, Sidecar, read_sidecar
from .base import Backend, BackendUnavailable, ServerUnavailable

log = logging.getLogger(__name__)

def parse_server(url: str) -> tuple[str, str]:
    """'grpc://host:8001' | 'http://host:8000' | 'host:8001' (gRPC) -> (protocol, 'host:port')."""
    u = urlparse(url if "://" in url else f"grpc://{url}")
    if u.scheme not in ("grpc", "http") or not u.hostname:
        raise ArtifactError(f"--server {url!r}: give grpc://HOST:8001 or http://HOST:8000")
    port = u.port or (8001 if u.scheme == "grpc" else 8000)
    return u.scheme, f"{u.hostname}:{port}"


def _is_unavailable(e: BaseException) -> bool:
    """Connection-level failures (server down, restarting, network) as opposed to refused requests."""
    if isinstance(e, (OSError, ConnectionError, TimeoutError)):
        return True
    status = str(getattr(e, "status", lambda: "")() or "")
    text = str(e).lower()
    return ("UNAVAILABLE" in status or "DEADLINE_EXCEEDED" in status or "failed to connect" in text
            or "connection refused" in text or "socket closed" in text or "connection reset" in text
            or "connection closed" in text or "broken pipe" in text)


class TritonBackend(Backend):
    name = "triton"
    selects_outputs = True  # infer(..., outputs=[...]) asks the server for those outputs only

    def __init__(self, server: str, model_name: str, local_model: str | Path | None = None, timeout_s: float = 10.0):
        try:
            from tritonclient.utils import InferenceServerException
        except ImportError as e:
            raise BackendUnavailable("tritonclient is not installed; `pip install edgead[triton]`") from e
        self._exc = InferenceServerException
        self.protocol, self.address = parse_server(server)
        self.server, self.model_name, self.timeout_s = server, model_name, timeout_s
        if self.protocol == "grpc":
            import tritonclient.grpc as client_mod
        else:
            import tritonclient.http as client_mod
        self._mod = client_mod
        self._tls = threading.local()
        self._generation = 0
        self._check_server()
        config = self._config()
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        served_sha = params.get("edgead_model_sha256", "")
        if local_model is not None:
            sidecar = read_sidecar(local_model, verify_hash=True)
            if served_sha and sidecar.model_sha256 != served_sha:
                raise ArtifactError(f"{local_model}: digest {sidecar.model_sha256[:12]} differs from the model "
                                    f"{model_name!r} the server serves ({served_sha[:12]}); export the repository "
                                    "again from this artifact (`python -m export triton`) or drop --model")
        elif params.get("edgead_sidecar"):
            sidecar = Sidecar.from_dict(json.loads(params["edgead_sidecar"]), source=f"{server}/{model_name} config")
            if sidecar.model_sha256 != served_sha:
                raise ArtifactError(f"{server}/{model_name}: the served sidecar's digest does not match the served "
                                    "model's; write the repository again with `python -m export triton`")
        else:
            raise ArtifactError(f"{server}/{model_name}: its config carries no edgead sidecar (not written by "
                                "`python -m export triton`); pass --model PATH of the artifact it serves")
        super().__init__(f"{server}/{model_name}", sidecar)
        self._check_io(config)

    @property
    def client(self):
        """One client per thread: the HTTP client (gevent) refuses calls from another thread than its own.
        ``close()`` retires every thread's client (a generation count): each thread makes a fresh one next."""
        c = getattr(self._tls, "client", None)
        if c is not None and getattr(self._tls, "generation", -1) != self._generation:
            self._close_client(c)  # a client of the server before a reconnect
            c = None
        if c is None:
            c = self._tls.client = self._new_client()
            self._tls.generation = self._generation
        return c

    def _new_client(self):
        if self.protocol == "http":  # its timeouts are the client's, not the request's
            return self._mod.InferenceServerClient(url=self.address, connection_timeout=self.timeout_s,
                                                   network_timeout=self.timeout_s)
        return self._mod.InferenceServerClient(url=self.address)

    # -- setup checks ------------------------------------------------------------------------------------------
    def _check_server(self) -> None:
        try:
            live = self.client.is_server_live()
        except Exception as e:  # connection refused, DNS, TLS: all mean "cannot reach"
            raise ServerUnavailable(f"cannot reach Triton at {self.server} ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:120]}); start the server or check --server") from e
        if not live:
            raise ServerUnavailable(f"Triton at {self.server} is not live yet; wait for it or check its log")
        if self.client.is_model_ready(self.model_name):
            return
        index = self.client.get_model_repository_index(**({"as_json": True} if self.protocol == "grpc" else {}))
        models = index.get("models", []) if isinstance(index, dict) else index
        states = {m.get("name"): (m.get("state", ""), m.get("reason", "")) for m in models}
        if self.model_name not in states:
            raise ArtifactError(f"model {self.model_name!r} is not in the repository of {self.server} (it holds: "
                                f"{', '.join(sorted(states)) or 'nothing'}); check --model-name")
        state, reason = states[self.model_name]
        raise ArtifactError(f"model {self.model_name!r} on {self.server} is not ready (state {state or 'unknown'}"
                            f"{': ' + reason.splitlines()[0][:200] if reason else ''}); see the server log")

    def _config(self) -> dict:
        if self.protocol == "grpc":
            return self.client.get_model_config(self.model_name, as_json=True)["config"]
        return self.client.get_model_config(self.model_name)

    def _check_io(self, config: dict) -> None:
        kw = {"as_json": True} if self.protocol == "grpc" else {}
        meta = self.client.get_model_metadata(self.model_name, **kw)
        self.max_batch = int(config.get("max_batch_size", 0))
        ins, outs = meta["inputs"], meta["outputs"]
        if len(ins) != 1:
            raise ArtifactError(f"{self.model_path}: serves {len(ins)} inputs, edgead sends one frame tensor; "
                                "serve an artifact written by `python -m export`")
        spec = self.sidecar.input
        self.input_name = ins[0]["name"]
        shape = [int(d) for d in ins[0]["shape"]]
        item = shape[1:]  # metadata shapes lead with the batch dim (-1 when batching, else the graph's)
        want = [spec.height, spec.width, 3] if spec.layout == "NHWC" else [3, spec.height, spec.width]
        if ins[0]["datatype"] != "UINT8" or item != want:
            raise ArtifactError(f"{self.model_path}: input {self.input_name!r} is {ins[0]['datatype']} {shape}, the "
                                f"sidecar expects UINT8 [N,{','.join(map(str, want))}]; the served model and its "
                                "sidecar differ: write the repository again from one artifact")
        self.fixed_batch = shape[0] if self.max_batch == 0 and shape[0] > 0 else None
        self.output_names = [o["name"] for o in outs]
        missing = [k for k in self.sidecar.outputs if k not in self.output_names]
        if missing:
            raise ArtifactError(f"{self.model_path}: the server's model lacks outputs {missing} its sidecar promises; "
                                "write the repository again from one artifact")
        # outputs declared as dims [1] + reshape [] (per-item scalars) come back [N,1]: give back the graph's [N]
        self._squeeze = {o["name"] for o in config.get("output", []) if "reshape" in o
                         and not o["reshape"].get("shape")}

    # -- inference ---------------------------------------------------------------------------------------------
    @property
    def provider(self) -> str:
        return f"triton:{self.protocol}://{self.address}/{self.model_name}"

    def infer(self, frames: np.ndarray, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """uint8 [N,H,W,3] -> the graph's outputs (``outputs``: only these names, in the graph's order)."""
        names = self.output_names if outputs is None else [k for k in self.output_names if k in outputs]
        if self.fixed_batch is not None and len(frames) != self.fixed_batch:
            raise ValueError(f"the served model takes batches of exactly {self.fixed_batch}")
        if self.max_batch and len(frames) > self.max_batch:  # the server refuses larger requests: split
            parts = [self.infer(frames[i:i + self.max_batch], outputs) for i in range(0, len(frames), self.max_batch)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        inp = self._mod.InferInput(self.input_name, list(frames.shape), "UINT8")
        inp.set_data_from_numpy(np.ascontiguousarray(frames))
        outs = [self._mod.InferRequestedOutput(k) for k in names]
        try:
            kw = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
            res = self.client.infer(self.model_name, [inp], outputs=outs, **kw)
        except Exception as e:
            if _is_unavailable(e):
                raise ServerUnavailable(f"Triton at {self.server} unreachable ({str(e).splitlines()[0][:120]})") from e
            raise RuntimeError(f"Triton refused the request for {self.model_name!r}: {str(e).splitlines()[0][:200]}") from e
        result = {}
        for k in names:
            a = res.as_numpy(k)
            result[k] = a.reshape(len(frames)) if k in self._squeeze else a
        return result

    def wait_ready(self, attempt: int, base: float = 0.5, max_delay: float = 30.0) -> bool:
        """Back off (base * 2^attempt s, capped), then say whether the server answers and the model is ready."""
        time.sleep(min(max_delay, base * 2 ** attempt))
        # a fresh client: http's pool keeps sockets of the dead server, and a gRPC channel that failed waits out
        # its own growing back-off before it dials again
        self.close()
        try:
            return bool(self.client.is_server_live() and self.client.is_model_ready(self.model_name))
        except Exception:  # still down
            return False

    def close(self) -> None:
        """Close this thread's client; other threads' clients are replaced on their next call."""
        self._generation += 1
        c, self._tls.client = getattr(self._tls, "client", None), None
        self._close_client(c)

    @staticmethod
    def _close_client(c) -> None:
        try:
            if c is not None:
                c.close()
        except Exception:  # closing a client of a dead server is not worth an error
            pass
