"""Checkpoint -> one ONNX graph that a deployment runs as is, plus its sidecar.

The graph takes raw uint8 NHWC frames in the camera's colour order and contains the
cast, colour order, scaling, mean/std, layout change, the three networks, quantile
normalization, map upsampling, the Mahalanobis score and the PUAD score combination.
The decision constants are named initializers (``runtime.artifact.CALIBRATION_INITIALIZERS``)
so calibration can rewrite them without re-export.
"""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from runtime.artifact import (CALIBRATION_INITIALIZERS, ArtifactError, GaussianInfo, InputSpec, Normalization,
                              ScoreSpec, Sidecar, Thresholds, atomic_write_bytes, file_sha256, write_sidecar)
from train.loop import load_checkpoint
from train.models.efficientad import OUTPUT_NAMES, EfficientAD

log = logging.getLogger(__name__)

MIN_OPSET, MAX_OPSET = 17, 21
# --fp16 keeps the frozen teacher in fp32: its features are divided by small per-channel stds, which turns fp16
# rounding into score errors above 1e-2 (measured on the test model: image score 0.0107 with an fp16 teacher,
# 0.0036 without)
FP16_PARTS = ("student", "autoencoder")
INPUT_NAME = "frames"


class ExportError(ArtifactError):
    pass


class _Deployed(torch.nn.Module):
    """Fixed output order for the exporter."""

    def __init__(self, model: EfficientAD):
        super().__init__()
        self.model = model

    def forward(self, frames: torch.Tensor):
        out = self.model(frames)
        return tuple(out[k] for k in OUTPUT_NAMES)


def _check_out_path(out: Path) -> None:
    if out.exists() and out.is_dir():
        raise ExportError(f"{out}: is a folder; give a file name such as model.onnx")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"{out}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"{out}: folder {parent} is not writable; choose another --out")


def _sentinels(model: EfficientAD) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Set each calibration buffer to distinct random values; return (true values, sentinel values).

    The exporter and onnxslim de-duplicate equal initializers and name them freely; unique
    sentinel values let us find each constant afterwards by value, whatever they did.
    """
    rng = np.random.default_rng(12345)
    true, sentinel = {}, {}
    for k, name in enumerate(CALIBRATION_INITIALIZERS):
        buf = getattr(model, name)
        true[name] = buf.detach().cpu().numpy().copy()
        sentinel[name] = (1000.0 + 10.0 * k + rng.random(buf.shape)).astype(np.float32)
        buf.copy_(torch.as_tensor(sentinel[name], dtype=buf.dtype))
    return true, sentinel


def name_calibration_initializers(model: onnx.ModelProto, true: dict[str, np.ndarray],
                                  sentinel: dict[str, np.ndarray]) -> None:
    """Find each sentinel initializer, give it its canonical name and its true value."""
    for canon in CALIBRATION_INITIALIZERS:
        want = sentinel[canon]
        hits = [i for i in model.graph.initializer
                if tuple(i.dims) == want.shape and np.array_equal(numpy_helper.to_array(i).astype(np.float32), want)]
        if len(hits) != 1:
            raise ExportError(f"exported graph has {len(hits)} initializers holding {canon!r}; "
                              "the exporter folded or duplicated it - pin torch/onnx versions or report a bug")
        init = hits[0]
        old = init.name
        init.CopyFrom(numpy_helper.from_array(true[canon].astype(numpy_helper.to_array(init).dtype), canon))
        for node in model.graph.node:
            for j, name in enumerate(node.input):
                if name == old:
                    node.input[j] = canon


def calibration_constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The rewritable constants of an exported graph, by canonical name."""
    inits = {i.name: i for i in model.graph.initializer}
    missing = [n for n in CALIBRATION_INITIALIZERS if n not in inits]
    if missing:
        raise ArtifactError(f"graph lacks calibration initializers {missing}; re-export it with `python -m export onnx`")
    return {n: numpy_helper.to_array(inits[n]) for n in CALIBRATION_INITIALIZERS}


def _simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim (constant folding, shape inference, dead-node removal); the caller falls back to the
    unsimplified graph if the result lost a calibration constant."""
    try:
        import onnxslim
    except ImportError:
        log.warning("onnxslim not installed: graph left unsimplified (pip install onnxslim)")
        return model
    try:
        slim = onnxslim.slim(model)
    except Exception as e:  # onnxslim raises assorted errors on exotic graphs
        log.warning("onnxslim failed (%s): graph left unsimplified", e)
        return model
    return slim


def sidecar_from_checkpoint(blob: dict, model: EfficientAD, model_file: str, batch: int | str, precision: str,
                            backend_format: str = "onnx") -> Sidecar:
    cfg = model.cfg
    return Sidecar(
        model_file=model_file, model_sha256="", backend_format=backend_format, precision=precision,
        model_name=cfg.name,
        input=InputSpec(height=cfg.image_size, width=cfg.image_size, color_order=cfg.color_order, batch=batch,
                        mean=list(cfg.mean), std=list(cfg.std)),
        normalization=Normalization(**blob["normalization"]),
        gaussian=GaussianInfo(**blob["gaussian"]),
        score=ScoreSpec(**blob["score"]),
        thresholds=Thresholds(**blob["thresholds"]),
        provenance={"source_shape": blob.get("source_shape"), "checkpoint_config": blob["config"], "train": {k: blob.get("train", {}).get(k) for k in
                                                                   ("data", "steps", "batch_size", "seed", "train_seconds")}},
    )


def _load_for_export(checkpoint: str | Path, out: Path, batch: int | str, fp16: bool,
                     fp16_teacher: bool) -> tuple[EfficientAD, dict, tuple[str, ...]]:
    """Checks shared by every export format; returns (model, checkpoint blob, fp16 networks)."""
    _check_out_path(out)
    if batch != "dynamic" and (not isinstance(batch, int) or batch < 1):
        raise ExportError(f"batch {batch!r}: give a positive integer or 'dynamic'")
    model, blob = load_checkpoint(checkpoint)
    if not bool(model.calibrated):
        raise ExportError(f"{checkpoint}: checkpoint has no map quantiles / Gaussian yet (training did not finish); "
                          "exporting would drop the normalization - re-run `python -m train`")
    parts = (FP16_PARTS + (("teacher",) if fp16_teacher else ())) if fp16 else ()
    if parts:
        model.half_networks(parts)
    return model, blob, parts


def _dummy_frames(model: EfficientAD, batch: int | str) -> torch.Tensor:
    h = w = model.cfg.image_size
    return torch.randint(0, 256, (2 if batch == "dynamic" else batch, h, w, 3), dtype=torch.uint8)


def export_onnx(checkpoint: str | Path, out: str | Path, fp16: bool = False, batch: int | str = 1,
                opset: int = 17, simplify: bool = True, fp16_teacher: bool = False) -> Path:
    """Write ``out`` (ONNX) and ``out.json`` (sidecar) atomically; returns ``out``."""
    out = Path(out)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset {opset} not supported; choose {MIN_OPSET}..{MAX_OPSET}")
    model, blob, parts = _load_for_export(checkpoint, out, batch, fp16, fp16_teacher)
    dyn = {INPUT_NAME: {0: "batch"}, **{k: {0: "batch"} for k in OUTPUT_NAMES}} if batch == "dynamic" else None
    buf = io.BytesIO()
    with torch.no_grad():
        true, sentinel = _sentinels(model)
        torch.onnx.export(_Deployed(model).eval(), (_dummy_frames(model, batch),), buf, input_names=[INPUT_NAME],
                          output_names=list(OUTPUT_NAMES), dynamic_axes=dyn, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
    graph = onnx.load_from_string(buf.getvalue())
    if simplify:  # while the sentinels are in: onnxslim also merges equal-valued initializers
        slim = _simplify(graph)
        try:
            name_calibration_initializers(slim, true, sentinel)
            graph = slim
        except ExportError as e:
            log.warning("onnxslim touched a calibration constant (%s): graph left unsimplified", e)
            name_calibration_initializers(graph, true, sentinel)
    else:
        name_calibration_initializers(graph, true, sentinel)
    graph.doc_string = "edgead EfficientAD+PUAD: uint8 NHWC frames -> anomaly map and scores (see sidecar)"
    onnx.checker.check_model(graph)
    atomic_write_bytes(out, graph.SerializeToString())
    sc = sidecar_from_checkpoint(blob, model, out.name, batch, "fp16" if fp16 else "fp32")
    if fp16:
        sc.provenance["fp16_networks"] = list(parts)
    sc.provenance.update({"opset": opset, "torch": str(torch.__version__), "onnx": onnx.__version__,
                          "checkpoint_sha256": file_sha256(checkpoint)})
    write_sidecar(out, sc)
    log.info("exported %s (%s, batch %s)", out, sc.precision, batch)
    return out


def export_torch_program(checkpoint: str | Path, out: str | Path, batch: int | str = 1, fp16: bool = False,
                         fp16_teacher: bool = False) -> Path:
    """``torch.export`` program (.pt2) + sidecar, for the runtime's torch backend (no edgead code needed to load)."""
    out = Path(out)
    model, blob, parts = _load_for_export(checkpoint, out, batch, fp16, fp16_teacher)
    dummy = _dummy_frames(model, batch)
    dyn = ({"frames": {0: torch.export.Dim("batch", min=1, max=1024)}},) if batch == "dynamic" else None
    with torch.no_grad():
        prog = torch.export.export(_Deployed(model).eval(), (dummy,), dynamic_shapes=dyn)
    buf = io.BytesIO()
    torch.export.save(prog, buf)
    atomic_write_bytes(out, buf.getvalue())
    sc = sidecar_from_checkpoint(blob, model, out.name, batch, "fp16" if fp16 else "fp32", backend_format="torch")
    if parts:
        sc.provenance["fp16_networks"] = list(parts)
    write_sidecar(out, sc)
    return out
