"""The deployed graph's own post-network part, cut out of the ONNX file, run with candidate constants.

Calibration must score exactly as the deployed model does (a numpy re-implementation once drifted
and shipped wrong thresholds). So it does not re-implement anything: it extracts from the exported
graph the subgraph from the raw network outputs (``raw_maps``, ``features``) to the scores, and runs
it with ONNX Runtime, overriding the named calibration initializers with the candidate values
(``SessionOptions.add_initializer``). The subgraph is the deployed arithmetic, whatever the family,
precision or smoothing. torch-free: onnx + onnxruntime.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from runtime.artifact import ArtifactError, Sidecar

from .fitting import CalibrationError

log = logging.getLogger(__name__)

SCORE_OUTPUTS = ("map_score", "gaussian_score", "image_score")


def source_graph(model_path: Path, sidecar: Sidecar) -> Path:
    """The ONNX file whose post-network part scores for this artifact (an engine's source ONNX)."""
    if model_path.suffix.lower() == ".onnx":
        return model_path
    name = sidecar.provenance.get("tensorrt", {}).get("onnx")
    src = model_path.with_name(name) if name else None
    if src is None or not src.is_file():
        raise CalibrationError(f"{model_path}: calibrating an engine needs the ONNX it was built from "
                               f"({name or 'unknown'}) next to it; copy it along or re-export")
    return src


class GraphPart:
    """raw_maps (+ features) -> map_score, [gaussian_score], image_score, by the graph's own nodes.

    ``inputs``/``outputs``: cut another part instead (e.g. ``patch_features -> raw_maps`` of a graph
    with a memory, run with a candidate memory); ``run`` then gives its outputs as they are."""

    def __init__(self, onnx_path: str | Path, has_gaussian: bool = False, inputs: list[str] | None = None,
                 outputs: list[str] | None = None):
        import onnx
        from onnx.utils import Extractor

        self.inputs = list(inputs) if inputs else ["raw_maps"] + (["features"] if has_gaussian else [])
        self.outputs = list(outputs) if outputs else [o for o in SCORE_OUTPUTS if has_gaussian or o != "gaussian_score"]
        model = onnx.load(str(onnx_path))
        names = {o.name for o in model.graph.output}
        missing = [n for n in self.inputs + self.outputs if n not in names]
        if missing:
            raise ArtifactError(f"{onnx_path}: graph lacks outputs {missing} that calibration needs; "
                                "re-export it with `python -m export onnx`")
        try:
            sub = Extractor(model).extract_model(self.inputs, self.outputs)
        except Exception as e:  # onnx raises assorted errors for graphs it cannot cut
            raise ArtifactError(f"{onnx_path}: cannot cut the scoring part out of the graph ({e}); re-export it") from e
        if sorted(i.name for i in sub.graph.input) != sorted(self.inputs):
            raise ArtifactError(f"{onnx_path}: the scores do not depend on {self.inputs} alone; re-export the model")
        # score any number of images at once: drop inferred intermediate shapes (a batch-1 export records
        # batch 1 there, and ONNX Runtime's optimizer would bake it into the reshapes it inserts)
        del sub.graph.value_info[:]
        for v in list(sub.graph.input) + list(sub.graph.output):
            dims = v.type.tensor_type.shape.dim
            if len(dims):
                dims[0].ClearField("dim_value")
                dims[0].dim_param = "N"
        self.initializers = {i.name for i in sub.graph.initializer}
        self._bytes = sub.SerializeToString()
        self._shapes = {i.name: tuple(i.dims) for i in sub.graph.initializer}

    def run(self, constants: dict[str, np.ndarray], feeds: dict[str, np.ndarray], batch: int = 256) -> dict[str, np.ndarray]:
        """The part's outputs (float32, concatenated over batches of ``batch`` images) for ``feeds``
        under ``constants`` (by initializer name; names the part does not use are ignored)."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        keep = []  # OrtValues must outlive the session
        for name, value in constants.items():
            if name not in self.initializers:
                continue
            arr = np.asarray(value, dtype=np.float32)
            if arr.size != int(np.prod(self._shapes[name], dtype=np.int64)):
                raise CalibrationError(f"constant {name!r}: {arr.size} values for a graph tensor of shape "
                                       f"{list(self._shapes[name])}; re-export the model")
            ov = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr.reshape(self._shapes[name])))
            keep.append(ov)
            opts.add_initializer(name, ov)
        sess = ort.InferenceSession(self._bytes, opts, providers=["CPUExecutionProvider"])
        n = len(next(iter(feeds.values())))
        acc: dict[str, list[np.ndarray]] = {k: [] for k in self.outputs}
        for i in range(0, n, batch):
            chunk = {k: np.ascontiguousarray(v[i:i + batch], np.float32) for k, v in feeds.items()}
            for k, v in zip(self.outputs, sess.run(self.outputs, chunk)):
                acc[k].append(np.asarray(v, np.float32))
        del keep
        return {k: np.concatenate(v) if v else np.zeros(0, np.float32) for k, v in acc.items()}

    def __call__(self, constants: dict[str, np.ndarray], raw_maps: np.ndarray,
                 features: np.ndarray | None = None, batch: int = 256) -> dict[str, np.ndarray]:
        """Scores (float64 [N] each) of stored raw outputs under ``constants`` (by initializer name)."""
        feeds = {"raw_maps": raw_maps}
        if "features" in self.inputs:
            feeds["features"] = features
        out = self.run(constants, feeds, batch)
        return {k: v.astype(np.float64).reshape(-1) for k, v in out.items()}
