"""Optional torch backend for workstation GPUs without TensorRT.

Loads a ``torch.export`` program (.pt2, written by ``python -m export torch``); needs
torch but no edgead training code. On CUDA it runs the networks in fp16 (channels-last)
and can capture a CUDA graph for a fixed batch. torch is imported only here, and only
when this backend is chosen.
"""
from __future__ import annotations

import logging

import numpy as np

from ..artifact import Sidecar
from .base import Backend, BackendUnavailable

log = logging.getLogger(__name__)


def _strip_metadata_asserts(gm) -> None:
    """Drop export-time dtype/device assertion nodes (pure checks, no outputs) before torch.compile:
    seen on an H100 with torch 2.11, dynamo rejected the device assertion of a program moved to CUDA."""
    import torch

    target = torch.ops.aten._assert_tensor_metadata.default
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is target and not node.users:
            gm.graph.erase_node(node)
            removed += 1
    if removed:
        gm.recompile()


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model_path: str, sidecar: Sidecar, device: str = "auto", cuda_graph: bool = True,
                 compile: bool = False):
        super().__init__(model_path, sidecar)
        try:
            import torch
        except ImportError as e:
            raise BackendUnavailable("the torch backend needs PyTorch; `pip install torch` or use onnxruntime") from e
        self.torch = torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable("--device cuda asked for the torch backend, but no CUDA GPU is visible")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        from torch.export.passes import move_to_device_pass

        prog = torch.export.load(model_path)
        # moves lifted constants too (module().to() leaves them on the export device)
        prog = move_to_device_pass(prog, self.device)
        self.module = prog.module()
        if self.device.type == "cuda":  # NHWC convolutions use the tensor cores best
            self.module = self.module.to(memory_format=torch.channels_last)
        if compile:  # inductor fuses the pointwise work between convolutions; CUDA graph below replays it
            _strip_metadata_asserts(self.module)
            self.module = torch.compile(self.module, dynamic=False)
        self.output_names = list(sidecar.outputs)
        self.use_graph = cuda_graph and self.device.type == "cuda"
        self._graphs: dict[tuple, tuple] = {}

    @property
    def provider(self) -> str:
        return f"torch:{self.device}{'+cudagraph' if self.use_graph else ''}"

    def _run(self, x):
        with self.torch.inference_mode():
            return self.module(x)

    def infer(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device, non_blocking=True)
        outs = self.infer_tensor(x)  # a dict: outputs by name (torch.export keeps the names)
        return {k: outs[k].float().cpu().numpy() for k in self.output_names if k in outs}

    def infer_tensor(self, x):
        """Frames already on the device (uint8 [N,H,W,3]) -> dict of output tensors on the device, by name."""
        if not self.use_graph:
            return self._run(x)
        key = tuple(x.shape)
        if key not in self._graphs:
            torch = self.torch
            static_in = x.clone()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    self._run(static_in)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g), torch.inference_mode():
                static_out = self.module(static_in)
            self._graphs[key] = (g, static_in, static_out)
        g, static_in, static_out = self._graphs[key]
        static_in.copy_(x)
        g.replay()
        return static_out
