"""INT8 by explicit quantization: insert Q/DQ nodes from calibration images.

Two recipes, because the two engines want different Q/DQ graphs:

- ``target="cpu"`` (ONNX Runtime on x86/ARM CPUs, the default): uint8 *asymmetric*
  activations and int8 symmetric per-channel weights. ORT runs that as U8S8 integer
  convolutions (AVX512-VNNI / AVX2 / ARM dot-product kernels); its S8S8 path is far slower
  on x86 (measured on the 2-core AMD EPYC, EfficientAD-S: 150 ms U8S8 vs 288 ms S8S8 vs
  417 ms fp32). Post-ReLU activations are non-negative, so uint8 with a free zero point
  also keeps a full 8 bits where symmetric int8 keeps 7. ReLU and average pooling are
  quantized too, so activations stay integer from one convolution to the next.
- ``target="tensorrt"``: int8 *symmetric* activations and weights (zero point 0, the only
  form TensorRT's explicit quantization accepts), Q/DQ around convolutions only;
  TensorRT fuses the rest itself.

Pre/post-processing and the PUAD statistics stay fp32 either way, so calibration can still
rewrite them. The frozen teacher stays fp32 unless ``quantize_teacher``: its features are
divided by small per-channel stds, which amplifies rounding (check the parity figures of
your model before switching it on; ``benchmarks/int8_accuracy.py`` measures both).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from runtime.artifact import ArtifactError, read_sidecar, write_sidecar
from runtime.dataset import list_images, read_image
from runtime.preprocess import batch_frames

log = logging.getLogger(__name__)

TARGETS = ("cpu", "tensorrt")


class _Reader:
    """onnxruntime CalibrationDataReader over a folder of images (prepared like the runtime does)."""

    def __init__(self, files: list[Path], h: int, w: int, input_name: str, batch: int):
        self.files, self.h, self.w, self.name, self.batch = files, h, w, input_name, batch
        self.i = 0

    def get_next(self):
        if self.i >= len(self.files):
            return None
        chunk = self.files[self.i:self.i + self.batch]
        self.i += self.batch
        frames = batch_frames([read_image(p) for p in chunk], self.h, self.w)
        if len(frames) < self.batch:
            frames = np.concatenate([frames, np.repeat(frames[-1:], self.batch - len(frames), 0)])
        return {self.name: frames}

    def rewind(self):
        self.i = 0


def _recipe(target: str) -> dict:
    from onnxruntime.quantization import QuantType

    if target == "cpu":
        return {"activation_type": QuantType.QUInt8, "op_types_to_quantize": ["Conv", "Relu", "AveragePool"],
                "extra_options": {"ActivationSymmetric": False, "WeightSymmetric": True, "CalibPercentile": 99.99}}
    if target == "tensorrt":
        return {"activation_type": QuantType.QInt8, "op_types_to_quantize": ["Conv"],
                "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True, "CalibPercentile": 99.99}}
    raise ArtifactError(f"INT8 target {target!r}: choose one of {', '.join(TARGETS)}")


def quantize_qdq(model_path: str | Path, out: str | Path, calib_images: str | Path, max_images: int = 64,
                 quantize_teacher: bool = False, target: str = "cpu") -> Path:
    """fp32 ONNX + calibration images -> Q/DQ ONNX (+ sidecar, precision "int8-qdq")."""
    try:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    except ImportError as e:
        raise ArtifactError("INT8 export needs onnxruntime's quantization tools; `pip install onnxruntime`") from e
    recipe = _recipe(target)
    model_path, out = Path(model_path), Path(out)
    sc = read_sidecar(model_path)
    if sc.precision != "fp32":
        raise ArtifactError(f"{model_path}: quantize an fp32 export (this one is {sc.precision})")
    files = list_images(Path(calib_images))[:max_images]
    if len(files) < 8:
        raise ArtifactError(f"{calib_images}: {len(files)} calibration images; give at least 8 good images")
    batch = sc.input.batch if isinstance(sc.input.batch, int) else 1
    import onnx

    graph = onnx.load(str(model_path))
    # the family's export policy names the parts that stay fp32: always the deploy head (its smoothing filters
    # the final map: 8-bit steps there would show up as score noise), and e.g. a frozen teacher whose features
    # are divided by small stds (unless ``quantize_teacher``, i.e. --int8-all)
    keep = sc.provenance.get("export_policy", {}).get("int8_keep_fp32", ["/head/"])
    # the deploy head by its full path under export's wrapper: a bare "/head/" also matched a network's own
    # sub-module named head (e.g. /model/autoencoder/head/), leaving those convolutions fp32
    keep = ["/model/head/"] + [k for k in keep if k != "/head/" and not quantize_teacher]
    exclude = [n.name for n in graph.graph.node if any(k in n.name for k in keep)]
    tmp = out.with_name(out.name + ".partial")
    try:
        quantize_static(str(model_path), str(tmp), _Reader(files, sc.input.height, sc.input.width, "frames", batch),
                        quant_format=QuantFormat.QDQ, per_channel=True, nodes_to_exclude=exclude,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.Percentile, **recipe)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    sc.precision = "int8-qdq"
    sc.provenance["int8"] = {"calibration_images": str(calib_images), "n": len(files), "method": "percentile 99.99",
                             "target": target, "kept_fp32": keep}
    write_sidecar(out, sc)
    return out
