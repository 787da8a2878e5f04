"""Checkpoint -> one ONNX graph that a deployment runs as is, plus its sidecar. Any model family.

The graph takes raw uint8 NHWC frames in the camera's colour order and contains the cast,
colour order, scaling, mean/std, layout change, the family's networks and the shared deploy
head (map normalization, smoothing, upsampling, the Gaussian score, the score mix). The head's
decision constants are named initializers (the sidecar's ``calibration_initializers``) so
calibration can rewrite them without re-export. Nothing here names a family: the checkpoint
records it and the registry rebuilds it.
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

from runtime.artifact import (STANDARD_OUTPUTS, ArtifactError, GaussianInfo, InputSpec, Normalization, ScoreSpec,
                              Sidecar, Thresholds, atomic_write_bytes, file_sha256, write_sidecar)
from train.loop import load_checkpoint
from train.models.base import AnomalyModel

log = logging.getLogger(__name__)

MIN_OPSET, MAX_OPSET = 17, 21
INPUT_NAME = "frames"


class ExportError(ArtifactError):
    pass


class _Deployed(torch.nn.Module):
    """Fixed output order for the ONNX exporter (``as_dict`` for torch.export, which keeps names)."""

    def __init__(self, model: AnomalyModel, as_dict: bool = False):
        super().__init__()
        self.model = model
        self.names = model.output_names()
        self.as_dict = as_dict

    def forward(self, frames: torch.Tensor):
        out = self.model(frames)
        if self.as_dict:
            return {k: out[k] for k in self.names}
        return tuple(out[k] for k in self.names)


def _check_out_path(out: Path) -> None:
    if out.exists() and out.is_dir():
        raise ExportError(f"{out}: is a folder; give a file name such as model.onnx")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"{out}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"{out}: folder {parent} is not writable; choose another --out")


def _calibration_buffers(model: AnomalyModel) -> dict[str, tuple[torch.nn.Module, str]]:
    """Every rewritable buffer by its initializer name: the head's and the family's own (e.g. a memory)."""
    out = {name: (model.head, name) for name in model.head.calibration_names}
    for path, name in model.extra_calibration_buffers():
        if name in out:
            raise ExportError(f"calibration buffer {path}.{name}: its name is taken; rename the buffer")
        out[name] = (model.get_submodule(path), name)
    return out


def _sentinels(model: AnomalyModel) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Set each calibration buffer to distinct random values; return (true values, sentinel values).

    The exporter and onnxslim de-duplicate equal initializers and name them freely; unique
    sentinel values let us find each constant afterwards by value, whatever they did.
    """
    rng = np.random.default_rng(12345)
    true, sentinel = {}, {}
    for k, (name, (owner, attr)) in enumerate(_calibration_buffers(model).items()):
        buf = getattr(owner, attr)
        true[name] = buf.detach().cpu().numpy().copy()
        sentinel[name] = (1000.0 + 10.0 * k + rng.random(buf.shape)).astype(np.float32)
        buf.copy_(torch.as_tensor(sentinel[name], dtype=buf.dtype))
    return true, sentinel


def _restore(model: AnomalyModel, true: dict[str, np.ndarray]) -> None:
    buffers = _calibration_buffers(model)
    for name, value in true.items():
        owner, attr = buffers[name]
        buf = getattr(owner, attr)
        buf.copy_(torch.as_tensor(value, dtype=buf.dtype))


def name_calibration_initializers(model: onnx.ModelProto, true: dict[str, np.ndarray],
                                  sentinel: dict[str, np.ndarray]) -> None:
    """Find each sentinel initializer, give it its canonical name and its true value."""
    for canon in true:
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


def calibration_constants(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """The rewritable constants of an exported graph, by canonical name."""
    inits = {i.name: i for i in model.graph.initializer}
    missing = [n for n in names if n not in inits]
    if missing:
        raise ArtifactError(f"graph lacks calibration initializers {missing}; re-export it with `python -m export onnx`")
    return {n: numpy_helper.to_array(inits[n]) for n in names}


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


def _legacy_calibration(blob: dict) -> dict:
    """Sidecar parts of checkpoints written before the shared head (edgead 0.1) in today's form."""
    n, s = blob.get("normalization", {}), blob.get("score", {})
    if "q_st_a" in n:
        n = {"map_names": ["student_teacher", "student_autoencoder"], "q_low": [n["q_st_a"], n["q_ae_a"]],
             "q_high": [n["q_st_b"], n["q_ae_b"]], "quantile_a": n.get("quantile_a", 0.9),
             "quantile_b": n.get("quantile_b", 0.995), "n_images": n.get("n_images", 0)}
    if "picturable_mean" in s:
        s = {"map_mean": s["picturable_mean"], "map_std": s["picturable_std"], "gaussian_mean": s["unpicturable_mean"],
             "gaussian_std": s["unpicturable_std"], "puad_weight": s.get("puad_weight", 0.5),
             "puad_gate": s.get("puad_gate")}
    t = {k: v for k, v in blob.get("thresholds", {}).items() if k in Thresholds.__dataclass_fields__}
    return {"normalization": n, "score": s, "thresholds": t}


def sidecar_from_checkpoint(blob: dict, model: AnomalyModel, model_file: str, batch: int | str, precision: str,
                            backend_format: str = "onnx") -> Sidecar:
    cfg = model.cfg
    names = model.output_names()
    meanings = {k: STANDARD_OUTPUTS[k][1] if k in STANDARD_OUTPUTS else model.extra_output_meanings[k] for k in names}
    roles = {k: STANDARD_OUTPUTS[k][0] if k in STANDARD_OUTPUTS else "raw" for k in names}
    parts = _legacy_calibration(blob)
    prov = {k: blob.get(k) for k in ("source_shape", "source_aspects", "source_colour", "classes") if blob.get(k) is not None}
    prov.update({"checkpoint_config": blob["config"], "train": {k: blob.get("train", {}).get(k) for k in
                 ("data", "steps", "batch_size", "seed", "train_seconds")},
                 "export_policy": {"fp16_parts": list(model.export_policy.fp16_parts),
                                   "int8_keep_fp32": list(model.export_policy.int8_keep_fp32)}})
    return Sidecar(
        model_file=model_file, model_sha256="", backend_format=backend_format, precision=precision,
        family=model.family, model_name=cfg.name,
        input=InputSpec(height=cfg.height, width=cfg.width, color_order=cfg.color_order, batch=batch,
                        fit=blob.get("fit", "stretch"), mean=list(cfg.mean), std=list(cfg.std)),
        outputs=meanings, roles=roles,
        head={"map_names": list(model.head.map_names), "smoothing_px": model.head.blur_px,
              "has_gaussian": bool(model.head.feature_dim), "grid": list(model.grid),
              "map_offset_px": list(model.head.drawn_offset_px)},
        normalization=Normalization(**parts["normalization"]),
        gaussian=GaussianInfo(**blob.get("gaussian", {})),
        score=ScoreSpec(**parts["score"]),
        thresholds=Thresholds(**parts["thresholds"]),
        calibration_initializers=list(_calibration_buffers(model)),
        family_params={"config": blob["config"], **model.family_params()},
        provenance=prov,
    )


def _load_for_export(checkpoint: str | Path, out: Path, batch: int | str, fp16: bool,
                     fp16_all: bool) -> tuple[AnomalyModel, dict, tuple[str, ...]]:
    """Checks shared by every export format; returns (model, checkpoint blob, fp16 networks)."""
    _check_out_path(out)
    if batch != "dynamic" and (not isinstance(batch, int) or batch < 1):
        raise ExportError(f"batch {batch!r}: give a positive integer or 'dynamic'")
    model, blob = load_checkpoint(checkpoint)
    if not bool(model.calibrated):
        raise ExportError(f"{checkpoint}: checkpoint has no map quantiles yet (training did not finish); "
                          "exporting would drop the normalization - re-run `python -m train`")
    parts: tuple[str, ...] = ()
    if fp16:
        parts = tuple(model.export_policy.fp16_parts)
        if fp16_all:
            parts += tuple(n for n, m in model.named_children() if n != "head" and n not in parts
                           and any(True for _ in m.parameters()))
    if parts:
        model.half_networks(parts)
    return model, blob, parts


def _dummy_frames(model: AnomalyModel, batch: int | str) -> torch.Tensor:
    return torch.randint(0, 256, (2 if batch == "dynamic" else batch, model.cfg.height, model.cfg.width, 3),
                         dtype=torch.uint8)


def export_onnx(checkpoint: str | Path, out: str | Path, fp16: bool = False, batch: int | str = 1,
                opset: int = 17, simplify: bool = True, fp16_teacher: bool = False) -> Path:
    """Write ``out`` (ONNX) and ``out.json`` (sidecar) atomically; returns ``out``.

    fp16: the family's fp16-safe networks in fp16 (``--fp16-teacher``: every network)."""
    out = Path(out)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset {opset} not supported; choose {MIN_OPSET}..{MAX_OPSET}")
    model, blob, parts = _load_for_export(checkpoint, out, batch, fp16, fp16_teacher)
    names = list(model.output_names())
    dyn = {INPUT_NAME: {0: "batch"}, **{k: {0: "batch"} for k in names}} if batch == "dynamic" else None
    buf = io.BytesIO()
    with torch.no_grad():
        true, sentinel = _sentinels(model)
        try:
            torch.onnx.export(_Deployed(model).eval(), (_dummy_frames(model, batch),), buf, input_names=[INPUT_NAME],
                              output_names=names, dynamic_axes=dyn, opset_version=opset,
                              do_constant_folding=True, dynamo=False)
        finally:
            _restore(model, true)
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
    graph.doc_string = f"edgead {model.family}: uint8 NHWC frames -> anomaly map and scores (see sidecar)"
    onnx.checker.check_model(graph)
    atomic_write_bytes(out, graph.SerializeToString())
    sc = sidecar_from_checkpoint(blob, model, out.name, batch, "fp16" if fp16 else "fp32")
    if fp16:
        sc.provenance["fp16_networks"] = list(parts)
    sc.provenance.update({"opset": opset, "torch": str(torch.__version__), "onnx": onnx.__version__,
                          "checkpoint_sha256": file_sha256(checkpoint)})
    write_sidecar(out, sc)
    log.info("exported %s (%s %s, batch %s)", out, model.family, sc.precision, batch)
    return out


def export_torch_program(checkpoint: str | Path, out: str | Path, batch: int | str = 1, fp16: bool = False,
                         fp16_teacher: bool = False) -> Path:
    """``torch.export`` program (.pt2) + sidecar, for the runtime's torch backend (no edgead code needed to load)."""
    out = Path(out)
    model, blob, parts = _load_for_export(checkpoint, out, batch, fp16, fp16_teacher)
    dummy = _dummy_frames(model, batch)
    dyn = ({"frames": {0: torch.export.Dim("batch", min=1, max=1024)}},) if batch == "dynamic" else None
    with torch.no_grad():
        prog = torch.export.export(_Deployed(model, as_dict=True).eval(), (dummy,), dynamic_shapes=dyn)
    buf = io.BytesIO()
    torch.export.save(prog, buf)
    atomic_write_bytes(out, buf.getvalue())
    sc = sidecar_from_checkpoint(blob, model, out.name, batch, "fp16" if fp16 else "fp32", backend_format="torch")
    if parts:
        sc.provenance["fp16_networks"] = list(parts)
    write_sidecar(out, sc)
    return out
